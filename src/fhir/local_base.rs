//! Which references name a resource stored on this server: relative `Type/id` always, an
//! absolute URL only under this server's own base URL. A reference to another server's
//! `Patient/x` must never put a resource into local patient x's compartment.

use std::sync::Arc;

use super::compartment::LiteralReference;

/// This server's base URL as references see it (no trailing slash), or none when it is not
/// known (an offline load without `--base-url`): then only relative references are local.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalBase {
    base_url: Option<Arc<str>>,
}

impl LocalBase {
    /// Only relative references are local.
    pub fn relative_only() -> LocalBase {
        LocalBase { base_url: None }
    }

    /// References relative or under `base_url` (such as `https://example.org/fhir`) are local.
    pub fn at(base_url: &str) -> LocalBase {
        LocalBase {
            base_url: Some(Arc::from(base_url.trim_end_matches('/'))),
        }
    }

    /// The base URL absolute references must start with to be local, if known.
    pub fn base_url(&self) -> Option<&str> {
        self.base_url.as_deref()
    }

    /// The type name a reference would name if it is local: the letters and digits that
    /// start it (after this server's base and `/`) up to a `/`. Reads only that far, so
    /// `reference` may run past the reference's end: a cheap test on raw JSON before
    /// `local_reference` when most references are of types the caller skips.
    pub fn local_type_name<'reference>(
        &self,
        reference: &'reference [u8],
    ) -> Option<&'reference [u8]> {
        let relative = match self.base_url.as_deref() {
            Some(base_url) => match reference.strip_prefix(base_url.as_bytes()) {
                Some(rest) => rest.strip_prefix(b"/")?,
                None => reference,
            },
            None => reference,
        };
        let type_length = relative
            .iter()
            .position(|byte| !byte.is_ascii_alphanumeric())?;
        (type_length > 0 && relative[type_length] == b'/').then(|| &relative[..type_length])
    }

    /// `reference` as a relative reference when it is an absolute URL under this server's
    /// base (`{base}/Patient/x` → `Patient/x`); any other reference unchanged.
    pub fn relative_form<'reference>(&self, reference: &'reference str) -> &'reference str {
        self.base_url
            .as_deref()
            .and_then(|base_url| reference.strip_prefix(base_url)?.strip_prefix('/'))
            .unwrap_or(reference)
    }

    /// The type and id a reference names when it names a resource of this server:
    /// `Type/id`, or `{base}/Type/id`, each optionally `/_history/version`; `None` for other
    /// servers' URLs, contained (`#id`), `urn:` and conditional references.
    pub(crate) fn local_reference<'reference>(
        &self,
        reference: &'reference str,
    ) -> Option<LiteralReference<'reference>> {
        let literal = LiteralReference::parse(reference)?;
        let type_start = literal.id_offset - 1 - literal.resource_type_name.len();
        if type_start == 0 {
            return Some(literal);
        }
        let reference_base = &reference[..type_start - 1];
        (self.base_url.as_deref() == Some(reference_base)).then_some(literal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn type_and_id(local_base: &LocalBase, reference: &str) -> Option<(String, String)> {
        local_base
            .local_reference(reference)
            .map(|literal| (literal.resource_type_name.to_owned(), literal.id.to_owned()))
    }

    #[test]
    fn relative_references_are_always_local() {
        for local_base in [
            LocalBase::relative_only(),
            LocalBase::at("https://ours.example/fhir"),
        ] {
            assert_eq!(
                type_and_id(&local_base, "Patient/x"),
                Some(("Patient".to_owned(), "x".to_owned()))
            );
            assert_eq!(
                type_and_id(&local_base, "Practitioner/p1/_history/3"),
                Some(("Practitioner".to_owned(), "p1".to_owned()))
            );
        }
    }

    #[test]
    fn the_cheap_type_name_is_the_type_of_every_local_reference() {
        let local_base = LocalBase::at("https://ours.example/fhir");
        for (reference, type_name) in [
            ("Practitioner/p1", Some("Practitioner")),
            ("Practitioner/p1/_history/2", Some("Practitioner")),
            (
                "https://ours.example/fhir/Organization/o",
                Some("Organization"),
            ),
            ("http://other.example/fhir/Organization/o", None),
            ("#inline", None),
            ("Practitioner", None),
        ] {
            assert_eq!(
                local_base.local_type_name(reference.as_bytes()),
                type_name.map(str::as_bytes),
                "{reference}"
            );
            let running_past_its_end = format!("{reference}\"}},{{\"reference\":\"Patient/x");
            assert_eq!(
                local_base.local_type_name(running_past_its_end.as_bytes()),
                type_name.map(str::as_bytes),
                "{reference}"
            );
            if let Some(literal) = local_base.local_reference(reference) {
                assert_eq!(Some(literal.resource_type_name), type_name, "{reference}");
            }
        }
    }

    #[test]
    fn absolute_references_are_local_only_under_this_base() {
        let local_base = LocalBase::at("https://ours.example/fhir/");
        assert_eq!(local_base.base_url(), Some("https://ours.example/fhir"));
        for local in [
            "https://ours.example/fhir/Patient/x",
            "https://ours.example/fhir/Patient/x/_history/2",
        ] {
            assert_eq!(
                type_and_id(&local_base, local),
                Some(("Patient".to_owned(), "x".to_owned())),
                "{local}"
            );
        }
        for foreign in [
            "http://other.example/fhir/Patient/x",
            "https://ours.example/fhir2/Patient/x",
            "https://ours.example/Patient/x",
            "https://ours.example.evil/fhir/Patient/x",
            "http://ours.example/fhir/Patient/x",
            "#x",
            "urn:uuid:1b9e6a4e-4d1c-4a59-9f7c-3f1e2b5c6d7e",
        ] {
            assert_eq!(type_and_id(&local_base, foreign), None, "{foreign}");
        }
        assert_eq!(
            type_and_id(
                &LocalBase::relative_only(),
                "https://ours.example/fhir/Patient/x"
            ),
            None
        );
    }
}
