use std::fmt;

/// A FHIR logical id: 1 to 64 characters from `[A-Za-z0-9\-\.]`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResourceId(String);

impl TryFrom<String> for ResourceId {
    type Error = ResourceIdParseError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        ResourceId::parse(&text)
    }
}

impl From<ResourceId> for String {
    fn from(id: ResourceId) -> String {
        id.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceIdParseError {
    #[error("resource id is empty")]
    Empty,
    #[error("resource id is {length} characters long; at most 64 are allowed")]
    TooLong { length: usize },
    #[error(
        "resource id '{id}' contains '{character}'; only A-Z, a-z, 0-9, '-' and '.' are allowed"
    )]
    InvalidCharacter { id: String, character: char },
}

impl ResourceId {
    pub const MAX_LENGTH: usize = 64;

    pub fn parse(candidate: &str) -> Result<ResourceId, ResourceIdParseError> {
        if candidate.is_empty() {
            return Err(ResourceIdParseError::Empty);
        }
        if let Some(character) = candidate.chars().find(|character| {
            !(character.is_ascii_alphanumeric() || *character == '-' || *character == '.')
        }) {
            return Err(ResourceIdParseError::InvalidCharacter {
                id: candidate.chars().take(80).collect(),
                character,
            });
        }
        if candidate.len() > Self::MAX_LENGTH {
            return Err(ResourceIdParseError::TooLong {
                length: candidate.len(),
            });
        }
        Ok(ResourceId(candidate.to_owned()))
    }

    /// A fresh server-assigned id (a random UUID).
    pub fn new_server_assigned() -> ResourceId {
        ResourceId(uuid::Uuid::new_v4().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for ResourceId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:?}", self.0)
    }
}

impl AsRef<str> for ResourceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_fhir_ids_and_rejects_everything_else() {
        assert!(ResourceId::parse("abc-DEF.123").is_ok());
        assert!(ResourceId::parse(&"a".repeat(64)).is_ok());
        assert_eq!(ResourceId::parse(""), Err(ResourceIdParseError::Empty));
        assert_eq!(
            ResourceId::parse(&"a".repeat(65)),
            Err(ResourceIdParseError::TooLong { length: 65 })
        );
        assert!(matches!(
            ResourceId::parse("a/b"),
            Err(ResourceIdParseError::InvalidCharacter { character: '/', .. })
        ));
        assert!(ResourceId::parse("a_b").is_err());
        assert!(ResourceId::parse("é").is_err());
        assert!(ResourceId::parse(ResourceId::new_server_assigned().as_str()).is_ok());
    }
}
