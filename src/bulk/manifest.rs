//! The export completion manifest: parsing and URL resolution.
//!
//! Accepts what real servers send: `requiresAccessToken` as a boolean or the string "true",
//! missing `error`/`deleted` arrays, relative file URLs (resolved against the status URL), and
//! manifests paged with `link` `next` (the client follows the pages and concatenates them).

use serde::Deserialize;
use url::Url;

use super::ExportError;

/// One file listed in the manifest.
#[derive(Debug, Clone)]
pub struct ManifestFile {
    pub resource_type: String,
    pub url: Url,
    /// The server's count of resources in the file, when it gave one.
    pub count: Option<u64>,
}

/// The parsed completion manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Exactly as the server sent it: the next incremental run passes it back as `_since`.
    pub transaction_time: String,
    pub request: Option<String>,
    pub requires_access_token: bool,
    pub output: Vec<ManifestFile>,
    pub error: Vec<ManifestFile>,
    pub deleted: Vec<ManifestFile>,
    /// The `Expires` header of the response that carried the manifest, if any: when the
    /// server may drop the files.
    pub expires: Option<String>,
    /// The next page of a paged manifest (`link` with relation `next`), not yet fetched.
    pub next: Option<Url>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    transaction_time: String,
    request: Option<String>,
    #[serde(default)]
    requires_access_token: serde_json::Value,
    #[serde(default)]
    output: Vec<RawFile>,
    #[serde(default)]
    error: Vec<RawFile>,
    #[serde(default)]
    deleted: Vec<RawFile>,
    #[serde(default)]
    link: Vec<RawLink>,
}

#[derive(Deserialize)]
struct RawLink {
    relation: String,
    url: String,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "type")]
    resource_type: String,
    url: String,
    count: Option<u64>,
}

impl Manifest {
    /// Parses a manifest body; `status_url` resolves relative file URLs.
    pub fn parse(body: &[u8], status_url: &Url) -> Result<Manifest, ExportError> {
        let raw: RawManifest = serde_json::from_slice(body).map_err(|e| {
            ExportError::BadResponse(format!("the export manifest is malformed: {e}"))
        })?;
        if crate::fhir::parse_instant(&raw.transaction_time).is_none() {
            return Err(ExportError::BadResponse(format!(
                "the export manifest's transactionTime {:?} is not a FHIR instant",
                raw.transaction_time
            )));
        }
        let requires_access_token = match &raw.requires_access_token {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::String(s) => s.eq_ignore_ascii_case("true"),
            serde_json::Value::Null => false,
            other => {
                return Err(ExportError::BadResponse(format!(
                    "requiresAccessToken {other} is not a boolean"
                )));
            }
        };
        let files = |raw: Vec<RawFile>, list: &str| -> Result<Vec<ManifestFile>, ExportError> {
            raw.into_iter()
                .map(|f| {
                    let url = status_url.join(&f.url).map_err(|e| {
                        ExportError::BadResponse(format!(
                            "manifest {list} url {:?} is not a URL: {e}",
                            f.url
                        ))
                    })?;
                    Ok(ManifestFile {
                        resource_type: f.resource_type,
                        url,
                        count: f.count,
                    })
                })
                .collect()
        };
        let next = match raw.link.iter().find(|l| l.relation == "next") {
            Some(link) => Some(status_url.join(&link.url).map_err(|e| {
                ExportError::BadResponse(format!(
                    "manifest next link {:?} is not a URL: {e}",
                    link.url
                ))
            })?),
            None => None,
        };
        Ok(Manifest {
            next,
            expires: None,
            transaction_time: raw.transaction_time,
            request: raw.request,
            requires_access_token,
            output: files(raw.output, "output")?,
            error: files(raw.error, "error")?,
            deleted: files(raw.deleted, "deleted")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Url {
        Url::parse("https://ehr.example.org/fhir/bulkstatus/42").unwrap()
    }

    #[test]
    fn parses_v2_manifest_with_relative_urls_and_string_flag() {
        let body = br#"{"transactionTime":"2024-05-01T10:00:00.000+02:00","request":"https://ehr.example.org/fhir/$export?_type=Patient",
            "requiresAccessToken":"true","output":[{"type":"Patient","url":"../files/p1.ndjson","count":3}],
            "error":[{"type":"OperationOutcome","url":"https://ehr.example.org/files/e.ndjson"}]}"#;
        let m = Manifest::parse(body, &status()).unwrap();
        assert_eq!(m.transaction_time, "2024-05-01T10:00:00.000+02:00");
        assert!(m.requires_access_token);
        assert_eq!(
            m.output[0].url.as_str(),
            "https://ehr.example.org/fhir/files/p1.ndjson"
        );
        assert_eq!(m.output[0].count, Some(3));
        assert_eq!(m.error.len(), 1);
        assert!(m.deleted.is_empty());
        assert!(m.next.is_none());
    }

    #[test]
    fn finds_the_next_page() {
        let body = br#"{"transactionTime":"2024-05-01T10:00:00Z","output":[],
            "link":[{"relation":"self","url":"x"},{"relation":"next","url":"42?page=2"}]}"#;
        let m = Manifest::parse(body, &status()).unwrap();
        assert_eq!(
            m.next.unwrap().as_str(),
            "https://ehr.example.org/fhir/bulkstatus/42?page=2"
        );
    }

    #[test]
    fn rejects_malformed_manifests() {
        for body in [
            &br#"{"output":[]}"#[..],
            br#"{"transactionTime":"yesterday","output":[]}"#,
            br#"{"transactionTime":"2024-05-01T10:00:00Z","requiresAccessToken":3}"#,
            br#"{"transactionTime":"2024-05-01T10:00:00Z","output":[{"url":"x"}]}"#,
            b"<html>",
        ] {
            let err = Manifest::parse(body, &status()).unwrap_err();
            assert!(!err.is_retryable(), "{err}");
        }
    }
}
