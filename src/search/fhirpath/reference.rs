//! What a `Reference.reference` string points at, as far as `resolve() is T` needs it.

/// The target of a reference string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferenceTarget<'reference> {
    /// `Type/id` or `Type/id/_history/version`.
    Relative {
        type_name: &'reference str,
        id: &'reference str,
    },
    /// `http(s)://…/Type/id[/_history/version]`. Whether it names a resource of this server
    /// is for the caller to decide by comparing `base_url` with the server's base URL;
    /// `resolve() is T` only needs the type.
    Absolute {
        base_url: &'reference str,
        type_name: &'reference str,
        id: &'reference str,
    },
    /// `#id`: a resource in the `contained` list of the resource holding the reference
    /// (`#` alone is the holding resource itself).
    Contained { id: &'reference str },
}

impl<'reference> ReferenceTarget<'reference> {
    /// `None` for `urn:` references, conditional references and anything else that names no
    /// type and id.
    pub fn parse(reference: &'reference str) -> Option<ReferenceTarget<'reference>> {
        if let Some(id) = reference.strip_prefix('#') {
            return Some(ReferenceTarget::Contained { id });
        }
        if reference.contains('?') {
            return None;
        }
        let unversioned = match reference.rfind("/_history/") {
            Some(marker) => &reference[..marker],
            None => reference,
        };
        let (type_and_base, id) = unversioned.rsplit_once('/')?;
        let (base_url, type_name) = match type_and_base.rsplit_once('/') {
            Some((base_url, type_name)) => (Some(base_url), type_name),
            None => (None, type_and_base),
        };
        if id.is_empty() || type_name.is_empty() {
            return None;
        }
        match base_url {
            None => Some(ReferenceTarget::Relative { type_name, id }),
            Some(base_url)
                if base_url.starts_with("http://") || base_url.starts_with("https://") =>
            {
                Some(ReferenceTarget::Absolute {
                    base_url,
                    type_name,
                    id,
                })
            }
            Some(_) => None,
        }
    }
}
