//! The fake server's unauthenticated discovery documents: SMART's
//! `.well-known/smart-configuration` and the FHIR `metadata` CapabilityStatement that declares
//! Bulk Data export and (the legacy way) the token endpoint.
//!
//! Both are built from the bound address and the server's options on every request and hold no
//! state. They must advertise only what the fake actually enforces (the accepted algorithms and
//! scope syntaxes, `private_key_jwt`, `client_credentials`); `.well-known` can be switched off
//! to make clients use the CapabilityStatement, and the export declaration left out.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::data::RESOURCE_TYPES;
use super::outcome;
use super::state::ServerState;

/// `GET /fhir/.well-known/smart-configuration`.
pub(crate) async fn smart_configuration(State(state): State<Arc<ServerState>>) -> Response {
    if !state.options.serve_smart_configuration {
        return outcome::error(StatusCode::NOT_FOUND, "not-found", "no such endpoint");
    }
    let body = json!({
        "issuer": state.fhir_base_url().as_str(),
        "token_endpoint": advertised_token_endpoint(&state),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": state.options.signing_algorithms,
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": [
            "system/*.read",
            "system/*.rs",
            "system/Patient.read",
            "system/Patient.rs",
            "system/Encounter.read",
            "system/Encounter.rs",
            "system/Observation.read",
            "system/Observation.rs",
            "system/Condition.read",
            "system/Condition.rs",
        ],
        "capabilities": state.options.capabilities,
    });
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

/// `GET /fhir/metadata`.
pub(crate) async fn metadata(State(state): State<Arc<ServerState>>) -> Response {
    let declare = state.options.declare_export;
    let mut resources = vec![
        json!({
            "type": "Patient",
            "operation": [{
                "name": "export",
                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
            }],
        }),
        json!({
            "type": "Group",
            "operation": [{
                "name": "export",
                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
            }],
        }),
    ];
    resources.extend(
        RESOURCE_TYPES
            .iter()
            .filter(|t| **t != "Patient")
            .map(|t| json!({ "type": t })),
    );
    if !declare {
        for resource in &mut resources {
            resource.as_object_mut().map(|r| r.remove("operation"));
        }
    }
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2024-01-01",
        "publisher": "fhir-sync",
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "software": { "name": "fhir-sync fake FHIR server" },
        "implementation": {
            "description": "in-process fake EHR for tests and demos",
            "url": state.fhir_base_url().as_str(),
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "security": {
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{ "url": "token", "valueUri": advertised_token_endpoint(&state) }],
                }],
                "service": [{
                    "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }],
                }],
            },
            "resource": resources,
            "operation": if declare {
                json!([{
                    "name": "export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                }])
            } else {
                json!([])
            },
        }],
    });
    outcome::fhir_json(StatusCode::OK, body.to_string())
}

/// The token endpoint discovery advertises: the fake's own, unless a test scripts another.
fn advertised_token_endpoint(state: &ServerState) -> String {
    state
        .options
        .faults
        .advertised_token_endpoint
        .clone()
        .unwrap_or_else(|| state.token_url().to_string())
}
