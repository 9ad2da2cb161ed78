//! TEMPORARY stub, replaced by the real fake server on merge.
#![allow(dead_code, unused_variables)]
pub const RESOURCE_TYPES: [&str; 4] = ["Patient", "Encounter", "Observation", "Condition"];
#[derive(Clone, Debug)] pub struct Dataset { pub seed: u64, pub patients: usize }
impl Dataset {
    pub fn new(seed: u64, patients: usize) -> Self { Dataset { seed, patients } }
    pub fn counts(&self) -> std::collections::BTreeMap<String, usize> { todo!() }
    pub fn total(&self) -> usize { todo!() }
}
#[derive(Default)] pub struct FakeOptions { pub polls_before_ready: u32 }
pub struct FakeFhirServer;
impl FakeFhirServer {
    pub async fn start(d: Dataset, o: FakeOptions) -> anyhow::Result<Self> { todo!() }
    pub fn fhir_base_url(&self) -> url::Url { todo!() }
    pub fn register_client(&self, c: &str, j: jsonwebtoken::jwk::JwkSet) { todo!() }
    pub async fn shutdown(self) {}
}
