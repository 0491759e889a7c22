//! `GET /fhir/{type}?…` and `POST /fhir/{type}/_search` (form body): Bundles of type
//! `searchset` with `total`, paged with `_count` over one fixed snapshot (see
//! [`super::paging`]); `_summary=count` answers with the total only; `_elements` subsets
//! each resource.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response as WarpResponse;

use super::paging::{self, Paging, PagingError};
use super::resource::run_blocking;
use super::response;
use super::{ApiError, AppState};
use crate::fhir::ResourceType;
use crate::search::elements::ElementsSelection;
use crate::search::execute::{self, PageRequest};
use crate::search::query::{SearchQuery, split_query};

/// A search as the client sent it: the URL query and, for `_search`, the form body.
pub struct SearchInput {
    pub resource_type: ResourceType,
    pub query: String,
    pub form_body: Option<Bytes>,
}

pub async fn search(state: Arc<AppState>, input: SearchInput) -> Result<WarpResponse, ApiError> {
    let store = state.store.clone();
    let base_url = state.base_url.as_str().to_owned();
    let local_base = state.local_base.clone();
    let bundle = run_blocking(move || {
        let resource_type = input.resource_type;
        let mut pairs = split_query(&input.query)?;
        if let Some(body) = &input.form_body {
            pairs.extend(form_urlencoded::parse(body).into_owned());
        }
        let paging = Paging::take_from(&mut pairs)?;
        let link_pairs = pairs.clone();
        let count_only = match paging::take_single(&mut pairs, "_summary")?.as_deref() {
            None | Some("false") => paging.count == 0,
            Some("count") => true,
            Some(other) => return Err(PagingError::UnsupportedSummary(other.to_owned()).into()),
        };
        let mut elements = ElementsSelection::default();
        let mut index = 0;
        while index < pairs.len() {
            if pairs[index].0 == "_elements" {
                let (_, value) = pairs.remove(index);
                elements.add_value_for_type(&value, resource_type)?;
            } else {
                index += 1;
            }
        }
        let query = SearchQuery::from_pairs(resource_type, &pairs)?.on_local_base(local_base);
        let snapshot_seq = paging::resolve_snapshot(&store, &paging)?;
        let page = execute::search_page(
            &store,
            &query,
            PageRequest {
                snapshot_seq,
                after_seq: paging.cursor.unwrap_or(0),
                count: if count_only { 0 } else { paging.count },
            },
        )?;
        let url = format!("{base_url}/{resource_type}");
        let mut links = vec![json!({
            "relation": "self",
            "url": paging::page_url(&url, &link_pairs, paging.count, snapshot_seq, paging.cursor),
        })];
        if page.more
            && let Some(last) = page.matches.last()
        {
            links.push(json!({
                "relation": "next",
                "url": paging::page_url(&url, &link_pairs, paging.count, snapshot_seq, Some(last.seq)),
            }));
        }
        let entries: Vec<Value> = page
            .matches
            .into_iter()
            .map(|found| {
                let mut resource = found.resource;
                if let Value::Object(fields) = &mut resource {
                    elements.apply(resource_type, fields);
                }
                json!({
                    "fullUrl": format!("{base_url}/{resource_type}/{}", found.id),
                    "resource": resource,
                    "search": {"mode": "match"},
                })
            })
            .collect();
        let mut bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": page.total,
            "link": links,
        });
        if !entries.is_empty() {
            bundle["entry"] = Value::Array(entries);
        }
        Ok(bundle)
    })
    .await?;
    Ok(response::fhir_json(StatusCode::OK, &bundle))
}
