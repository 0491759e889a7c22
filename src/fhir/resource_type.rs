use std::fmt;

use super::resource_type_names::RESOURCE_TYPE_NAMES;

/// One of the 147 concrete FHIR R4 resource types, interned as a `u16` code whose order
/// is the order of the type names.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceType(u16);

/// A string that is not a concrete FHIR R4 resource type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a FHIR R4 resource type")]
pub struct UnknownResourceType(pub String);

impl ResourceType {
    pub const PATIENT: ResourceType = ResourceType::from_known_name("Patient");
    pub const GROUP: ResourceType = ResourceType::from_known_name("Group");
    pub const PROVENANCE: ResourceType = ResourceType::from_known_name("Provenance");

    /// Every R4 resource type, in code order.
    pub fn all() -> impl Iterator<Item = ResourceType> {
        (0..RESOURCE_TYPE_NAMES.len() as u16).map(ResourceType)
    }

    pub fn parse(name: &str) -> Result<ResourceType, UnknownResourceType> {
        RESOURCE_TYPE_NAMES
            .binary_search(&name)
            .map(|index| ResourceType(index as u16))
            .map_err(|_| UnknownResourceType(name.to_owned()))
    }

    /// The type for a code read back from storage; `None` for a code no type has.
    pub fn from_code(code: u16) -> Option<ResourceType> {
        ((code as usize) < RESOURCE_TYPE_NAMES.len()).then_some(ResourceType(code))
    }

    pub fn code(self) -> u16 {
        self.0
    }

    pub fn as_str(self) -> &'static str {
        RESOURCE_TYPE_NAMES[self.0 as usize]
    }

    const fn from_known_name(name: &str) -> ResourceType {
        let mut index = 0;
        while index < RESOURCE_TYPE_NAMES.len() {
            if const_str_eq(RESOURCE_TYPE_NAMES[index], name) {
                return ResourceType(index as u16);
            }
            index += 1;
        }
        panic!("not an R4 resource type");
    }
}

const fn const_str_eq(left: &str, right: &str) -> bool {
    let (left, right) = (left.as_bytes(), right.as_bytes());
    if left.len() != right.len() {
        return false;
    }
    let mut index = 0;
    while index < left.len() {
        if left[index] != right[index] {
            return false;
        }
        index += 1;
    }
    true
}

impl fmt::Display for ResourceType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Debug for ResourceType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl serde::Serialize for ResourceType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ResourceType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        ResourceType::parse(&name).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for ResourceType {
    type Err = UnknownResourceType;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        ResourceType::parse(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_official_r4_list_shipped_in_data() {
        let official: Vec<&str> = include_str!("../../data/r4/resource-types.txt")
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        let ours: Vec<&str> = ResourceType::all().map(ResourceType::as_str).collect();
        assert_eq!(ours, official);
    }

    #[test]
    fn parse_round_trips_and_rejects_unknown_names() {
        assert_eq!(
            ResourceType::parse("Patient").unwrap(),
            ResourceType::PATIENT
        );
        assert_eq!(ResourceType::PATIENT.as_str(), "Patient");
        assert_eq!(ResourceType::GROUP.as_str(), "Group");
        assert!(ResourceType::parse("patient").is_err());
        assert!(ResourceType::parse("Resource").is_err());
        assert!(ResourceType::parse("").is_err());
        let observation = ResourceType::parse("Observation").unwrap();
        assert_eq!(
            ResourceType::from_code(observation.code()),
            Some(observation)
        );
        assert_eq!(ResourceType::from_code(u16::MAX), None);
    }
}
