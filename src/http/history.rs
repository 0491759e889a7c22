//! `_history` at instance, type and system level: Bundles of type `history`, newest
//! version first, paged with `_count` over one fixed snapshot (see [`super::paging`]);
//! `_since` keeps versions committed at or after an instant.

use std::sync::Arc;

use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::paging::{self, Paging, PagingError};
use super::resource::run_blocking;
use super::response::{self, version_etag};
use super::{ApiError, AppState};
use crate::fhir::{ResourceId, ResourceType};
use crate::store::{HistoryRead, HistoryScope, StoredVersion};

/// Whose history a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryTarget {
    Instance(ResourceType, ResourceId),
    Type(ResourceType),
    System,
}

impl HistoryTarget {
    fn scope(&self) -> HistoryScope<'_> {
        match self {
            HistoryTarget::Instance(resource_type, id) => {
                HistoryScope::Instance(*resource_type, id)
            }
            HistoryTarget::Type(resource_type) => HistoryScope::Type(*resource_type),
            HistoryTarget::System => HistoryScope::System,
        }
    }

    fn url(&self, base_url: &str) -> String {
        match self {
            HistoryTarget::Instance(resource_type, id) => {
                format!("{base_url}/{resource_type}/{id}/_history")
            }
            HistoryTarget::Type(resource_type) => format!("{base_url}/{resource_type}/_history"),
            HistoryTarget::System => format!("{base_url}/_history"),
        }
    }
}

/// Splits a raw query on `&` and `=` and percent-decodes each part (`+` stays a plus, as
/// in the offset of a FHIR instant).
pub fn decode_query(raw: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.replace('+', "%2B").as_bytes())
        .into_owned()
        .collect()
}

pub async fn history(
    state: Arc<AppState>,
    target: HistoryTarget,
    query: String,
) -> Result<WarpResponse, ApiError> {
    let store = state.store.clone();
    let base_url = state.base_url.as_str().to_owned();
    let bundle = run_blocking(move || {
        let mut pairs = decode_query(&query);
        let paging = Paging::take_from(&mut pairs)?;
        let since_text = paging::take_single(&mut pairs, "_since")?;
        let since = since_text.as_deref().map(paging::parse_since).transpose()?;
        if let Some((name, _)) = pairs.first() {
            return Err(PagingError::UnknownHistoryParameter(name.clone()).into());
        }
        let snapshot_seq = paging::resolve_snapshot(&store, &paging)?;
        let total = match &target {
            HistoryTarget::Instance(resource_type, id) => {
                if store.read_current(*resource_type, id)?.is_none() {
                    return Err(ApiError::NotFound(format!(
                        "{resource_type}/{id} is not known"
                    )));
                }
                Some(store.instance_history_count(*resource_type, id, snapshot_seq, since)?)
            }
            HistoryTarget::Type(_) | HistoryTarget::System => None,
        };
        let page = store.history_page(
            target.scope(),
            HistoryRead {
                snapshot_seq,
                before_seq: paging.cursor,
                since,
                count: paging.count,
            },
        )?;
        let link_pairs: Vec<(String, String)> = since_text
            .into_iter()
            .map(|since| ("_since".to_owned(), since))
            .collect();
        let url = target.url(&base_url);
        let mut links = vec![json!({
            "relation": "self",
            "url": paging::page_url(&url, &link_pairs, paging.count, snapshot_seq, paging.cursor),
        })];
        if page.more
            && let Some(last) = page.versions.last()
        {
            links.push(json!({
                "relation": "next",
                "url": paging::page_url(&url, &link_pairs, paging.count, snapshot_seq, Some(last.seq)),
            }));
        }
        let entries: Vec<Value> = page
            .versions
            .iter()
            .map(|version| history_entry(&base_url, version))
            .collect();
        let mut bundle = json!({
            "resourceType": "Bundle",
            "type": "history",
            "link": links,
            "entry": entries,
        });
        if let Some(total) = total {
            bundle["total"] = json!(total);
        }
        Ok(bundle)
    })
    .await?;
    Ok(response::fhir_json(StatusCode::OK, &bundle))
}

fn history_entry(base_url: &str, version: &StoredVersion) -> Value {
    let (resource_type, id) = (version.resource_type, &version.id);
    let (method, url, status) = match (&version.body, version.version) {
        (None, _) => ("DELETE", format!("{resource_type}/{id}"), "200 OK"),
        (Some(_), 1) => ("POST", resource_type.to_string(), "201 Created"),
        (Some(_), _) => ("PUT", format!("{resource_type}/{id}"), "200 OK"),
    };
    let mut entry = json!({
        "fullUrl": format!("{base_url}/{resource_type}/{id}"),
        "request": { "method": method, "url": url },
        "response": {
            "status": status,
            "etag": version_etag(version.version),
            "lastModified": version.last_updated.to_fhir_string(),
        },
    });
    if let Some(body) = &version.body
        && let Ok(resource) = serde_json::from_str::<Value>(body)
    {
        entry["resource"] = resource;
    }
    entry
}
