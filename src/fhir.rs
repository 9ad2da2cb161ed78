//! The small part of FHIR R4 vocabulary the rest of the crate needs: resource type names, the
//! syntax of resource ids and of instants.
//!
//! This module parses nothing from the network and performs no IO; it only answers questions
//! about names and strings, so config validation and the loader agree on what is valid.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Every resource type of FHIR R4 (4.0.1), sorted, 146 names, excluding the abstract `Resource` and
/// `DomainResource`.
#[rustfmt::skip]
pub const R4_RESOURCE_TYPES: &[&str] = &[
    "Account", "ActivityDefinition", "AdverseEvent", "AllergyIntolerance", "Appointment",
    "AppointmentResponse", "AuditEvent", "Basic", "Binary", "BiologicallyDerivedProduct",
    "BodyStructure", "Bundle", "CapabilityStatement", "CarePlan", "CareTeam", "CatalogEntry",
    "ChargeItem", "ChargeItemDefinition", "Claim", "ClaimResponse", "ClinicalImpression",
    "CodeSystem", "Communication", "CommunicationRequest", "CompartmentDefinition", "Composition",
    "ConceptMap", "Condition", "Consent", "Contract", "Coverage", "CoverageEligibilityRequest",
    "CoverageEligibilityResponse", "DetectedIssue", "Device", "DeviceDefinition", "DeviceMetric",
    "DeviceRequest", "DeviceUseStatement", "DiagnosticReport", "DocumentManifest",
    "DocumentReference", "EffectEvidenceSynthesis", "Encounter", "Endpoint", "EnrollmentRequest",
    "EnrollmentResponse", "EpisodeOfCare", "EventDefinition", "Evidence", "EvidenceVariable",
    "ExampleScenario", "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal",
    "GraphDefinition", "Group", "GuidanceResponse", "HealthcareService", "ImagingStudy",
    "Immunization", "ImmunizationEvaluation", "ImmunizationRecommendation",
    "ImplementationGuide", "InsurancePlan", "Invoice", "Library", "Linkage", "List", "Location",
    "Measure", "MeasureReport", "Media", "Medication", "MedicationAdministration",
    "MedicationDispense", "MedicationKnowledge", "MedicationRequest", "MedicationStatement",
    "MedicinalProduct", "MedicinalProductAuthorization", "MedicinalProductContraindication",
    "MedicinalProductIndication", "MedicinalProductIngredient", "MedicinalProductInteraction",
    "MedicinalProductManufactured", "MedicinalProductPackaged", "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect", "MessageDefinition", "MessageHeader",
    "MolecularSequence", "NamingSystem", "NutritionOrder", "Observation", "ObservationDefinition",
    "OperationDefinition", "OperationOutcome", "Organization", "OrganizationAffiliation",
    "Parameters", "Patient", "PaymentNotice", "PaymentReconciliation", "Person", "PlanDefinition",
    "Practitioner", "PractitionerRole", "Procedure", "Provenance", "Questionnaire",
    "QuestionnaireResponse", "RelatedPerson", "RequestGroup", "ResearchDefinition",
    "ResearchElementDefinition", "ResearchStudy", "ResearchSubject", "RiskAssessment",
    "RiskEvidenceSynthesis", "Schedule", "SearchParameter", "ServiceRequest", "Slot", "Specimen",
    "SpecimenDefinition", "StructureDefinition", "StructureMap", "Subscription", "Substance",
    "SubstanceNucleicAcid", "SubstancePolymer", "SubstanceProtein",
    "SubstanceReferenceInformation", "SubstanceSourceMaterial", "SubstanceSpecification",
    "SupplyDelivery", "SupplyRequest", "Task", "TerminologyCapabilities", "TestReport",
    "TestScript", "ValueSet", "VerificationResult", "VisionPrescription",
];

/// Whether `name` is an R4 resource type (case-sensitive, as on the wire).
pub fn is_resource_type(name: &str) -> bool {
    R4_RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// The resource type closest to a misspelled `name`, when one is close enough to be a likely
/// typo (used for "did you mean" hints in config errors).
pub fn closest_resource_type(name: &str) -> Option<&'static str> {
    R4_RESOURCE_TYPES
        .iter()
        .map(|candidate| {
            let distance =
                strsim::levenshtein(&name.to_ascii_lowercase(), &candidate.to_ascii_lowercase());
            (distance, *candidate)
        })
        .filter(|(distance, _)| *distance <= 3)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// FHIR `id` syntax: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Parses a FHIR `instant` (RFC 3339 with a mandatory offset, e.g. `2024-05-01T10:00:00.123Z`).
///
/// FHIR's own grammar is narrower than RFC 3339's, and the narrowing matters: year 0000 and
/// offsets beyond ±14:00 (which PostgreSQL's `timestamptz` refuses as well) are not instants.
pub fn parse_instant(text: &str) -> Option<OffsetDateTime> {
    let instant = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let offset_minutes = instant.offset().whole_minutes().abs();
    (instant.year() >= 1 && offset_minutes <= 14 * 60).then_some(instant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_type_list_is_sorted_and_unique() {
        assert!(R4_RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(R4_RESOURCE_TYPES.len(), 146);
    }

    #[test]
    fn recognises_resource_types_and_suggests_fixes() {
        assert!(is_resource_type("Observation"));
        assert!(!is_resource_type("observation"));
        assert!(!is_resource_type("Obsrvation"));
        assert_eq!(closest_resource_type("Obsrvation"), Some("Observation"));
        assert_eq!(closest_resource_type("patient"), Some("Patient"));
        assert_eq!(closest_resource_type("Xyzzyplugh"), None);
    }

    #[test]
    fn id_syntax() {
        for ok in ["a", "pat-1.2", &"x".repeat(64)] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn instants() {
        assert!(parse_instant("2024-05-01T10:00:00.123Z").is_some());
        assert!(parse_instant("2024-05-01T10:00:00+02:00").is_some());
        assert!(parse_instant("2024-05-01").is_none());
        assert!(parse_instant("yesterday").is_none());
        assert!(parse_instant("0001-01-01T00:00:00Z").is_some());
        assert!(parse_instant("2024-05-01T10:00:00-14:00").is_some());
        assert!(parse_instant("0000-01-01T00:00:00Z").is_none());
        assert!(parse_instant("2024-05-01T10:00:00+23:00").is_none());
        assert!(parse_instant("2024-05-01T10:00:00+14:01").is_none());
    }
}
