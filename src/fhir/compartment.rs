use super::ResourceType;
pub struct PatientCompartment;
impl PatientCompartment {
    pub fn r4() -> &'static PatientCompartment {
        &PatientCompartment
    }
    pub fn patient_ids(
        &self,
        resource_type: ResourceType,
        resource: &serde_json::Value,
    ) -> Vec<String> {
        if resource_type == ResourceType::PATIENT {
            return vec![resource["id"].as_str().unwrap_or_default().to_owned()];
        }
        resource["subject"]["reference"]
            .as_str()
            .and_then(|reference| reference.strip_prefix("Patient/"))
            .map(|id| vec![id.to_owned()])
            .unwrap_or_default()
    }
}
