//! SMART scopes in the `system/` context, v1 (`system/Patient.read`, `.write`, `.*`) and
//! v2 (`system/Observation.rs`, `.cud`). v2 scopes with a query are refused until the
//! server can search.

use std::collections::BTreeSet;
use std::fmt;

use crate::fhir::ResourceType;

/// One kind of access a scope can grant (the v2 letters c, r, u, d, s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Access {
    const fn bit(self) -> u8 {
        match self {
            Access::Create => 1,
            Access::Read => 2,
            Access::Update => 4,
            Access::Delete => 8,
            Access::Search => 16,
        }
    }
}

/// The v2 letters in the order SMART requires them.
const V2_LETTERS: [(char, Access); 5] = [
    ('c', Access::Create),
    ('r', Access::Read),
    ('u', Access::Update),
    ('d', Access::Delete),
    ('s', Access::Search),
];
const ALL_ACCESS: u8 = 31;
const V1_READ: u8 = Access::Read.bit() | Access::Search.bit();
const V1_WRITE: u8 = Access::Create.bit() | Access::Update.bit() | Access::Delete.bit();

/// Why a scope string is not one this server grants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope '{0}' is not a system/ resource scope (system/Type.read or system/Type.rs)")]
    Unsupported(String),
    #[error("scope '{0}' has a query; scopes with queries are not supported yet")]
    WithQuery(String),
}

/// One parsed `system/` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    text: String,
    /// `None` is the `*` wildcard.
    resource_type: Option<ResourceType>,
    access_bits: u8,
}

impl Scope {
    pub fn parse(text: &str) -> Result<Scope, ScopeError> {
        let unsupported = || ScopeError::Unsupported(text.chars().take(100).collect());
        let rest = text.strip_prefix("system/").ok_or_else(unsupported)?;
        let (type_part, access_part) = rest.rsplit_once('.').ok_or_else(unsupported)?;
        if access_part.contains('?') {
            return Err(ScopeError::WithQuery(text.chars().take(100).collect()));
        }
        let resource_type = match type_part {
            "*" => None,
            name => Some(ResourceType::parse(name).map_err(|_| unsupported())?),
        };
        let access_bits = match access_part {
            "read" => V1_READ,
            "write" => V1_WRITE,
            "*" => ALL_ACCESS,
            letters => parse_v2_letters(letters).ok_or_else(unsupported)?,
        };
        Ok(Scope {
            text: text.to_owned(),
            resource_type,
            access_bits,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn permits(&self, resource_type: ResourceType, access: Access) -> bool {
        self.resource_type.is_none_or(|own| own == resource_type)
            && self.access_bits & access.bit() != 0
    }

    /// Whether everything `requested` grants, this scope grants too.
    pub fn covers(&self, requested: &Scope) -> bool {
        let types_covered = match (self.resource_type, requested.resource_type) {
            (None, _) => true,
            (Some(own), Some(asked)) => own == asked,
            (Some(_), None) => false,
        };
        types_covered && requested.access_bits & !self.access_bits == 0
    }
}

/// `cruds` in that order, each letter at most once, at least one.
fn parse_v2_letters(letters: &str) -> Option<u8> {
    let mut bits = 0;
    let mut next_allowed = 0;
    for letter in letters.chars() {
        let position = V2_LETTERS[next_allowed..]
            .iter()
            .position(|(allowed, _)| *allowed == letter)?;
        bits |= V2_LETTERS[next_allowed + position].1.bit();
        next_allowed += position + 1;
    }
    (bits != 0).then_some(bits)
}

/// The scopes a client holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    /// Space-separated scopes; every one must be a supported `system/` scope.
    pub fn parse_all(text: &str) -> Result<ScopeSet, ScopeError> {
        text.split_ascii_whitespace()
            .map(Scope::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(ScopeSet)
    }

    pub fn from_scopes(scopes: Vec<Scope>) -> ScopeSet {
        ScopeSet(scopes)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn permits(&self, resource_type: ResourceType, access: Access) -> bool {
        self.0
            .iter()
            .any(|scope| scope.permits(resource_type, access))
    }

    /// Whether one of these scopes covers `requested`.
    pub fn covers(&self, requested: &Scope) -> bool {
        self.0.iter().any(|scope| scope.covers(requested))
    }

    /// The types these scopes allow `access` to; `None` when a wildcard allows every type.
    pub fn types_permitting(&self, access: Access) -> Option<BTreeSet<ResourceType>> {
        let mut types = BTreeSet::new();
        for scope in self
            .0
            .iter()
            .filter(|scope| scope.access_bits & access.bit() != 0)
        {
            match scope.resource_type {
                None => return None,
                Some(resource_type) => {
                    types.insert(resource_type);
                }
            }
        }
        Some(types)
    }
}

/// Space-separated, as OAuth writes scopes.
impl fmt::Display for ScopeSet {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, scope) in self.0.iter().enumerate() {
            if index > 0 {
                formatter.write_str(" ")?;
            }
            formatter.write_str(scope.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(text: &str) -> Scope {
        Scope::parse(text).unwrap()
    }

    #[test]
    fn v1_and_v2_scopes_grant_their_access() {
        let patient = ResourceType::PATIENT;
        let observation = ResourceType::parse("Observation").unwrap();
        assert!(scope("system/*.read").permits(patient, Access::Read));
        assert!(!scope("system/*.read").permits(patient, Access::Create));
        assert!(scope("system/Patient.write").permits(patient, Access::Delete));
        assert!(!scope("system/Patient.write").permits(patient, Access::Read));
        assert!(scope("system/Observation.rs").permits(observation, Access::Read));
        assert!(!scope("system/Observation.rs").permits(patient, Access::Read));
        assert!(scope("system/*.cud").permits(observation, Access::Update));
        assert!(!scope("system/*.cud").permits(observation, Access::Read));
        assert!(scope("system/Patient.*").permits(patient, Access::Search));
    }

    #[test]
    fn malformed_or_foreign_scopes_are_refused() {
        for text in [
            "patient/*.read",
            "user/Patient.rs",
            "openid",
            "system/Nope.read",
            "system/Patient.sr",
            "system/Patient.rr",
            "system/Patient.",
            "system/Patient.x",
            "system/Patient",
        ] {
            assert!(
                matches!(Scope::parse(text), Err(ScopeError::Unsupported(_))),
                "{text}"
            );
        }
        assert!(matches!(
            Scope::parse("system/Observation.rs?category=laboratory"),
            Err(ScopeError::WithQuery(_))
        ));
    }

    #[test]
    fn a_wildcard_registration_covers_narrower_requests_only() {
        let registered = ScopeSet::parse_all("system/*.read system/Patient.cud").unwrap();
        assert!(registered.covers(&scope("system/Patient.read")));
        assert!(registered.covers(&scope("system/Observation.rs")));
        assert!(registered.covers(&scope("system/Observation.r")));
        assert!(registered.covers(&scope("system/Patient.write")));
        assert!(!registered.covers(&scope("system/Observation.write")));
        assert!(!registered.covers(&scope("system/*.write")));
        assert!(!registered.covers(&scope("system/*.*")));
        let narrow = ScopeSet::parse_all("system/Patient.read").unwrap();
        assert!(!narrow.covers(&scope("system/*.read")));
    }

    #[test]
    fn readable_types_are_listed_unless_a_wildcard_reads_all() {
        let narrow = ScopeSet::parse_all("system/Patient.read system/*.write").unwrap();
        assert_eq!(
            narrow.types_permitting(Access::Read),
            Some(BTreeSet::from([ResourceType::PATIENT]))
        );
        assert_eq!(narrow.types_permitting(Access::Create), None);
    }
}
