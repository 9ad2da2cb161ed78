//! The fake server's Bulk Data export: kick-off (system, Patient and Group level), status
//! polling with `Retry-After`, the completion manifest, cancellation, and NDJSON file downloads.
//!
//! An export is planned at kick-off as a list of files, each a run of data set indices, so the
//! manifest's counts are fixed before anything is served and always equal the lines a download
//! yields. Files are generated chunk by chunk while streaming; this module must never build a
//! whole file, or the whole data set, in memory.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::auth::{self, Bearer, is_resource_type_name, scope_allows_read};
use super::data::{Dataset, RESOURCE_TYPES, format_instant};
use super::faults::take;
use super::outcome;
use super::personality;
use super::state::{IssuedToken, ServerState};

pub use super::personality::ALL_PATIENTS_GROUP_ID;

const NDJSON: &str = "application/fhir+ndjson";
/// The `_outputFormat` values the Bulk Data spec says a server SHALL accept.
const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];
/// File bodies are produced in chunks of about this size.
pub(crate) use super::exports::{Export, ExportFile, Keep};

const CHUNK_BYTES: usize = 64 * 1024;

/// `GET /fhir/$export` and `GET /fhir/Patient/$export`. All four types are in the Patient
/// compartment, so both levels export the same data.
pub(crate) async fn kick_off(
    State(state): State<Arc<ServerState>>,
    Bearer(token): Bearer,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    let pairs = query_pairs(&uri);
    start_export(state, token, uri, headers, None, "GET", pairs).await
}

/// `GET /fhir/Group/{id}/$export`; only [`ALL_PATIENTS_GROUP_ID`] exists.
pub(crate) async fn group_kick_off(
    State(state): State<Arc<ServerState>>,
    Bearer(token): Bearer,
    Path(group): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    let pairs = query_pairs(&uri);
    start_export(state, token, uri, headers, Some(group), "GET", pairs).await
}

/// `POST /fhir/$export` and `POST /fhir/Patient/$export` with a `Parameters` body.
pub(crate) async fn post_kick_off(
    State(state): State<Arc<ServerState>>,
    Bearer(token): Bearer,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match parameters_body(&headers, &body) {
        Ok(pairs) => start_export(state, token, uri, headers, None, "POST", pairs).await,
        Err(diagnostics) => outcome::error(StatusCode::BAD_REQUEST, "invalid", &diagnostics),
    }
}

/// `POST /fhir/Group/{id}/$export` with a `Parameters` body.
pub(crate) async fn group_post_kick_off(
    State(state): State<Arc<ServerState>>,
    Bearer(token): Bearer,
    Path(group): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match parameters_body(&headers, &body) {
        Ok(pairs) => start_export(state, token, uri, headers, Some(group), "POST", pairs).await,
        Err(diagnostics) => outcome::error(StatusCode::BAD_REQUEST, "invalid", &diagnostics),
    }
}

fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The kick-off parameters of a POST: a FHIR `Parameters` resource sent as
/// `application/fhir+json`, each parameter a `value[x]` primitive or a `valueReference`.
fn parameters_body(headers: &HeaderMap, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(outcome::FHIR_JSON))
    {
        return Err("a POST kick-off must send Content-Type application/fhir+json".into());
    }
    let parameters: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "the POST body is not JSON".to_string())?;
    if parameters["resourceType"] != "Parameters" {
        return Err("the POST body must be a Parameters resource".into());
    }
    let mut pairs = Vec::new();
    for parameter in parameters["parameter"].as_array().into_iter().flatten() {
        let name = parameter["name"]
            .as_str()
            .ok_or("a parameter has no name")?
            .to_string();
        let value = parameter
            .as_object()
            .and_then(|o| {
                o.iter().find_map(|(key, value)| {
                    if key == "valueReference" {
                        value["reference"].as_str().map(str::to_string)
                    } else if key.starts_with("value") {
                        match value {
                            serde_json::Value::String(s) => Some(s.clone()),
                            serde_json::Value::Bool(b) => Some(b.to_string()),
                            other => Some(other.to_string()),
                        }
                    } else {
                        None
                    }
                })
            })
            .ok_or_else(|| format!("parameter {name:?} has no value"))?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

async fn start_export(
    state: Arc<ServerState>,
    token: IssuedToken,
    uri: Uri,
    headers: HeaderMap,
    group: Option<String>,
    method: &str,
    pairs: Vec<(String, String)>,
) -> Response {
    let vendor = state.options.vendor;
    // The group's members, when a test set them; every patient for the personality's groups.
    let members: Option<Option<Vec<usize>>> = match &group {
        None => Some(None),
        Some(g) => match state.lock().groups.get(g) {
            Some(members) => Some(Some(members.clone())),
            None if personality::group_ids(vendor).contains(&g.as_str()) => Some(None),
            None if state.options.faults.unknown_groups_empty => Some(Some(Vec::new())),
            None => None,
        },
    };
    let Some(members) = members else {
        return outcome::error(
            StatusCode::NOT_FOUND,
            "not-found",
            "no Group with this id exists",
        );
    };
    if let Err(diagnostics) = check_kick_off_headers(&headers) {
        return outcome::error(StatusCode::BAD_REQUEST, "invalid", diagnostics);
    }
    state.lock().kick_offs.push(super::RecordedKickOff {
        method: method.to_string(),
        path: uri.path().to_string(),
        params: pairs.clone(),
    });
    let params = match KickOffParams::parse_pairs(&pairs) {
        Ok(params) => params,
        Err(diagnostics) => {
            return outcome::error(StatusCode::BAD_REQUEST, "invalid", &diagnostics);
        }
    };
    if method == "GET" && pairs.iter().any(|(name, _)| name == "patient") {
        return outcome::error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "the patient parameter is only supported with POST",
        );
    }
    {
        let faults = &state.options.faults;
        if let Some((status, content_type, body)) = &faults.kick_off_answer {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let content_type = HeaderValue::from_str(content_type)
                .unwrap_or(HeaderValue::from_static("text/plain"));
            return (
                status,
                [(header::CONTENT_TYPE, content_type)],
                Body::from(body.clone()),
            )
                .into_response();
        }
        let mut inner = state.lock();
        if take(&mut inner.faults.kick_off_429, faults.kick_off_429) {
            return too_many_requests("too many requests; slow down");
        }
        if take(
            &mut inner.faults.kick_off_500_outcome,
            faults.kick_off_500_outcome,
        ) {
            return outcome::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "File generation failed",
            );
        }
        if take(&mut inner.faults.kick_off_503, faults.kick_off_503) {
            return outcome::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "the export service is briefly unavailable",
            );
        }
        let level = if group.is_some() {
            crate::vendor::Level::Group
        } else if uri.path().ends_with("/Patient/$export") {
            crate::vendor::Level::Patient
        } else {
            crate::vendor::Level::System
        };
        let request = personality::KickOffRequest {
            level,
            group: group.as_deref(),
            pairs: &pairs,
            headers: &headers,
        };
        if let Err(refusal) = personality::check_kick_off(vendor, &inner, &token, &request) {
            return *refusal;
        }
        if faults.one_export_at_a_time
            && inner
                .exports
                .values()
                .any(|e| e.client_id == token.client_id)
        {
            return outcome::export_in_progress();
        }
    }
    // `patient` references narrow the export to those patients (of the group's members, for
    // a group export).
    let mut patients: Option<HashSet<usize>> = members.map(|m| m.into_iter().collect());
    if !params.patients.is_empty() {
        let mut asked = HashSet::new();
        for reference in &params.patients {
            let index = reference
                .strip_prefix("Patient/")
                .and_then(|id| state.dataset.patient_index(id));
            match index {
                Some(index) => {
                    asked.insert(index);
                }
                None => {
                    return outcome::error(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        &format!("patient {reference:?} is not a known Patient reference"),
                    );
                }
            }
        }
        patients = Some(match patients {
            Some(members) => asked.intersection(&members).copied().collect(),
            None => asked,
        });
    }
    let keep = Arc::new(Keep {
        patients,
        removed: state.lock().removed.clone(),
    });
    let types = match authorised_types(&token, params.types) {
        Ok(types) => types,
        Err(diagnostics) => {
            return outcome::error(StatusCode::FORBIDDEN, "forbidden", &diagnostics);
        }
    };

    let transaction_time = OffsetDateTime::now_utc();
    let since = {
        let mut inner = state.lock();
        let since = personality::effective_since(vendor, &inner, &token.client_id, params.since);
        inner
            .last_exports
            .insert(token.client_id.clone(), transaction_time);
        since
    };
    let dataset = state.dataset.clone();
    let per_file = state.options.resources_per_file.max(1);
    // With `_since` the planner reads every resource's lastUpdated, which is CPU work
    // proportional to the data set; keep it off the async worker threads.
    let planned = keep.clone();
    let files = match tokio::task::spawn_blocking(move || {
        plan_kept_files(&dataset, &types, since, per_file, &planned)
    })
    .await
    {
        Ok(files) => files,
        Err(_) => {
            return outcome::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "planning the export failed",
            );
        }
    };

    let id = uuid::Uuid::new_v4().simple().to_string();
    let origin = state.origin.as_str().trim_end_matches('/');
    let request = match uri.path_and_query() {
        Some(pq) => format!("{origin}{pq}"),
        None => format!("{origin}{}", uri.path()),
    };
    let file_count = files.len();
    let mut inner = state.lock();
    inner.faults.exports_started += 1;
    let (failing_export, failing_files) = state.options.faults.failed_files_in_export;
    let failed_files = if inner.faults.exports_started == failing_export {
        failing_files.min(files.len())
    } else {
        0
    };
    inner.exports.insert(
        id.clone(),
        Export {
            client_id: token.client_id,
            transaction_time,
            request,
            since,
            group,
            status_polls: 0,
            files,
            keep,
            failed_files,
        },
    );
    drop(inner);
    tracing::debug!(
        export.files = file_count,
        "fake fhir server accepted an export kick-off"
    );
    let status_url = state.url(&format!("{}/bulkstatus/{id}", state.base_path()));
    let mut response = StatusCode::ACCEPTED.into_response();
    // A `Url` never contains bytes that are invalid in a header value.
    if let Ok(value) = HeaderValue::from_str(status_url.as_str()) {
        response
            .headers_mut()
            .insert(header::CONTENT_LOCATION, value);
    }
    response
}

/// Bulk Data kick-off requires `Accept: application/fhir+json` and `Prefer: respond-async`.
/// Like the reference server, anything other than exactly that media type is refused.
fn check_kick_off_headers(headers: &HeaderMap) -> Result<(), &'static str> {
    let accept: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !matches!(accept.as_slice(), [one] if one.trim().eq_ignore_ascii_case(outcome::FHIR_JSON)) {
        return Err("the Accept header must be application/fhir+json");
    }
    let respond_async = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|preference| {
            let token = preference.split([';', '=']).next().unwrap_or("");
            token.trim().eq_ignore_ascii_case("respond-async")
        });
    if !respond_async {
        return Err("the Prefer header must contain respond-async");
    }
    Ok(())
}

/// The kick-off parameters the fake understands; the spec lets a server ignore the rest.
#[derive(Debug, PartialEq)]
struct KickOffParams {
    /// `None` when `_type` was absent: every type the token may read.
    types: Option<Vec<String>>,
    since: Option<OffsetDateTime>,
    /// `patient` references (`Patient/123`), in the order sent.
    patients: Vec<String>,
}

impl KickOffParams {
    /// Parses the raw query. Decoding is form-style, so an unencoded `+` in `_since` or
    /// `_outputFormat` becomes a space and is refused, as on a real server.
    #[cfg(test)]
    fn parse(query: &str) -> Result<Self, String> {
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Self::parse_pairs(&pairs)
    }

    /// Parses decoded (name, value) pairs, from a query string or a `Parameters` body.
    fn parse_pairs(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut types: Option<Vec<String>> = None;
        let mut since = None;
        let mut patients = Vec::new();
        for (name, value) in pairs {
            let value = value.as_str();
            match name.as_str() {
                // Repeated `_type` parameters are treated as if comma-joined (Bulk Data v2).
                "_type" => {
                    let list = types.get_or_insert_with(Vec::new);
                    for resource_type in value.split(',') {
                        if !is_resource_type_name(resource_type) {
                            return Err(format!(
                                "_type entry {resource_type:?} is not a FHIR resource type"
                            ));
                        }
                        if !list.iter().any(|t| t == resource_type) {
                            list.push(resource_type.to_string());
                        }
                    }
                }
                "_until" => {
                    OffsetDateTime::parse(value, &Rfc3339).map_err(|_| {
                        format!(
                            "_until {value:?} is not a FHIR instant (e.g. 2024-01-01T00:00:00Z)"
                        )
                    })?;
                }
                "_outputFormat" if !OUTPUT_FORMATS.contains(&value) => {
                    return Err(format!(
                        "_outputFormat {value:?} is not supported; use application/fhir+ndjson"
                    ));
                }
                "_since" => {
                    if since.is_some() {
                        return Err("_since may be given only once".to_string());
                    }
                    let parsed = OffsetDateTime::parse(value, &Rfc3339).map_err(|_| {
                        format!(
                            "_since {value:?} is not a FHIR instant (e.g. 2024-01-01T00:00:00Z)"
                        )
                    })?;
                    if parsed > OffsetDateTime::now_utc() {
                        return Err("_since is in the future".to_string());
                    }
                    since = Some(parsed);
                }
                "patient" => patients.push(value.to_string()),
                _ => {}
            }
        }
        Ok(KickOffParams {
            types,
            since,
            patients,
        })
    }
}

/// The types to export: the requested ones, each of which the token must be allowed to read
/// (the caller answers 403 otherwise, as SMART's "enforce authorization" asks), or by default
/// every known type the token may read.
fn authorised_types(
    token: &IssuedToken,
    requested: Option<Vec<String>>,
) -> Result<Vec<String>, String> {
    let readable = |t: &str| token.scopes.iter().any(|s| scope_allows_read(s, t));
    match requested {
        Some(types) => match types.iter().find(|t| !readable(t)) {
            Some(denied) => Err(format!(
                "the access token's scopes do not allow reading {denied}"
            )),
            None => Ok(types),
        },
        None => {
            let types: Vec<String> = RESOURCE_TYPES
                .iter()
                .filter(|t| readable(t))
                .map(|t| t.to_string())
                .collect();
            if types.is_empty() {
                Err("the access token's scopes do not allow reading any resource type".to_string())
            } else {
                Ok(types)
            }
        }
    }
}

/// Splits each type's matching resources into files of at most `per_file`, in type order.
/// Types with no matching resources get no file.
#[cfg(test)]
fn plan_files(
    dataset: &Dataset,
    types: &[String],
    since: Option<OffsetDateTime>,
    per_file: usize,
) -> Vec<ExportFile> {
    plan_kept_files(dataset, types, since, per_file, &Keep::default())
}

/// [`plan_files`] of the resources `keep` keeps.
fn plan_kept_files(
    dataset: &Dataset,
    types: &[String],
    since: Option<OffsetDateTime>,
    per_file: usize,
    keep: &Keep,
) -> Vec<ExportFile> {
    let mut files = Vec::new();
    for resource_type in types {
        let total = dataset.count(resource_type);
        let mut runs: Vec<(usize, usize)> = Vec::new();
        match since {
            None if keep.everything() => {
                runs.extend(
                    (0..total)
                        .step_by(per_file)
                        .map(|first| (first, per_file.min(total - first))),
                );
            }
            since => {
                for index in 0..total {
                    if since
                        .is_some_and(|since| dataset.last_updated(resource_type, index) <= since)
                        || !keep.keeps(dataset, resource_type, index)
                    {
                        continue;
                    }
                    match runs.last_mut() {
                        Some((_, count)) if *count < per_file => *count += 1,
                        _ => runs.push((index, 1)),
                    }
                }
            }
        }
        files.extend(
            runs.into_iter()
                .enumerate()
                .map(|(n, (first_index, count))| ExportFile {
                    resource_type: resource_type.clone(),
                    name: format!("{resource_type}-{}.ndjson", n + 1),
                    first_index,
                    count,
                }),
        );
    }
    files
}

/// Query of a status request: `page` selects a later page of a paged manifest.
#[derive(serde::Deserialize)]
pub(crate) struct StatusQuery {
    page: Option<usize>,
}

/// `GET /fhir/bulkstatus/{id}`.
pub(crate) async fn status(
    State(state): State<Arc<ServerState>>,
    Bearer(token): Bearer,
    Path(id): Path<String>,
    Query(query): Query<StatusQuery>,
) -> Response {
    let options = &state.options;
    let faults = &options.faults;
    let manifest = {
        let mut inner = state.lock();
        let inner = &mut *inner;
        let Some(export) = inner
            .exports
            .get_mut(&id)
            .filter(|e| e.client_id == token.client_id)
        else {
            return unknown_export();
        };
        if let Some(diagnostics) = &faults.status_fatal {
            return outcome::error(StatusCode::INTERNAL_SERVER_ERROR, "exception", diagnostics);
        }
        if take(&mut inner.faults.status_429, faults.status_429) {
            let mut response = too_many_requests("too many status requests; slow down");
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(faults.status_429_retry_after_seconds),
            );
            return response;
        }
        if take(&mut inner.faults.status_transient, faults.status_transient) {
            return outcome::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "transient",
                "the export worker restarted; poll again",
            );
        }
        export.status_polls += 1;
        if export.status_polls <= options.polls_before_ready {
            let progress = format!(
                "in progress ({}/{})",
                export.status_polls, options.polls_before_ready
            );
            return in_progress(
                options.retry_after_seconds,
                faults.retry_after_http_date,
                &progress,
            );
        }
        manifest(
            &state,
            &id,
            export,
            inner.faults.link_generation,
            query.page.unwrap_or(1),
        )
    };
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::EXPIRES,
                HeaderValue::from_static("Wed, 21 Oct 2099 07:28:00 GMT"),
            ),
        ],
        manifest.to_string(),
    )
        .into_response()
}

/// A 429 with `Retry-After: 0` and an OperationOutcome, as a rate-limited server answers.
fn too_many_requests(diagnostics: &str) -> Response {
    let mut response = outcome::error(StatusCode::TOO_MANY_REQUESTS, "throttled", diagnostics);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(0));
    response
}

fn in_progress(retry_after_seconds: u64, as_date: bool, progress: &str) -> Response {
    let mut response = StatusCode::ACCEPTED.into_response();
    let headers = response.headers_mut();
    if as_date {
        let when =
            std::time::SystemTime::now() + std::time::Duration::from_secs(retry_after_seconds);
        if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(when)) {
            headers.insert(header::RETRY_AFTER, value);
        }
    } else {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
    }
    if let Ok(value) = HeaderValue::from_str(progress) {
        headers.insert("x-progress", value);
    }
    response
}

/// The name of the error file an export lists when `Faults::error_file` is set.
const ERROR_FILE: &str = "errors.ndjson";

/// One page (1-based) of the manifest. File links carry the current link generation, so links
/// handed out before an expiry stop working after it.
fn manifest(
    state: &ServerState,
    id: &str,
    export: &Export,
    generation: u32,
    page: usize,
) -> serde_json::Value {
    let faults = &state.options.faults;
    let link = |name: &str| -> String {
        if faults.query_string_parts {
            format!(
                "{}?part={name}&sig={generation}",
                state.url(&format!("{}/bulkfiles/{id}/data", state.base_path()))
            )
        } else if faults.relative_urls {
            // Relative to `/fhir/bulkstatus/{id}`.
            format!("../bulkfiles/{id}/{name}?sig={generation}")
        } else {
            format!(
                "{}?sig={generation}",
                state.url(&format!("{}/bulkfiles/{id}/{name}", state.base_path()))
            )
        }
    };
    let page_size = faults.manifest_page_size.unwrap_or(usize::MAX);
    // Files moved to `error[]` are not in `output`.
    let listed = &export.files[export.failed_files..];
    let pages = listed.len().div_ceil(page_size).max(1);
    let page = page.clamp(1, pages);
    let mut output: Vec<serde_json::Value> = listed
        .iter()
        .skip((page - 1).saturating_mul(page_size))
        .take(page_size)
        .map(|file| {
            json!({
                "type": file.resource_type,
                "url": link(&file.name),
                "count": file.count,
            })
        })
        .collect();
    if page == 1 {
        for (n, (resource_type, _)) in faults.extra_files.iter().enumerate() {
            output.push(json!({ "type": resource_type, "url": link(&extra_file_name(n)) }));
        }
        for (resource_type, url) in &faults.foreign_files {
            output.push(json!({ "type": resource_type, "url": url }));
        }
    }
    let mut error: Vec<serde_json::Value> = if faults.error_file && page == 1 {
        vec![json!({ "type": "OperationOutcome", "url": link(ERROR_FILE) })]
    } else {
        Vec::new()
    };
    if page == 1 {
        error.extend(
            (0..export.failed_files)
                .map(|n| json!({ "type": "OperationOutcome", "url": link(&failed_file_name(n)) })),
        );
    }
    let deleted: Vec<serde_json::Value> =
        if (faults.deleted_resources > 0 || faults.deleted_body.is_some()) && page == 1 {
            vec![json!({ "type": "Bundle", "url": link(DELETED_FILE) })]
        } else {
            Vec::new()
        };
    let requires_access_token = if faults.requires_access_token_as_string {
        json!(state.options.requires_access_token.to_string())
    } else {
        json!(state.options.requires_access_token)
    };
    let mut body = json!({
        "transactionTime": format_instant(export.transaction_time),
        "request": export.request,
        "requiresAccessToken": requires_access_token,
        "output": output,
        "error": error,
    });
    if !deleted.is_empty() {
        body["deleted"] = json!(deleted);
    }
    if faults.manifest_padding_bytes > 0 {
        body["padding"] = json!("x".repeat(faults.manifest_padding_bytes));
    }
    if page < pages {
        let next = state.url(&format!("{}/bulkstatus/{id}", state.base_path()));
        body["link"] = json!([{ "relation": "next", "url": format!("{next}?page={}", page + 1) }]);
    }
    body
}

/// The name of the error file that stands for the `n`th output file moved to `error[]`.
fn failed_file_name(n: usize) -> String {
    format!("failed-{n}.ndjson")
}

/// The error file of an output file moved to `error[]`: one OperationOutcome, as the
/// reference server writes it.
fn failed_file_lines(file: &ExportFile) -> Vec<u8> {
    let line = json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "error",
            "code": "processing",
            "diagnostics": format!("Failed to export {} ({} resources)", file.name, file.count),
        }],
    });
    let mut body = line.to_string().into_bytes();
    body.push(b'\n');
    body
}

/// The name of the deleted file an export lists when `Faults::deleted_resources` is set.
const DELETED_FILE: &str = "deleted.ndjson";

/// The name of the `n`th of `Faults::extra_files`.
fn extra_file_name(n: usize) -> String {
    format!("extra-{n}.ndjson")
}

/// The deleted file: one transaction Bundle of `n` DELETE entries, as the spec describes.
fn deleted_lines(n: u32) -> Vec<u8> {
    let entries: Vec<serde_json::Value> = (1..=n)
        .map(
            |i| json!({ "request": { "method": "DELETE", "url": format!("Patient/deleted-{i}") } }),
        )
        .collect();
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
    let mut body = bundle.to_string().into_bytes();
    body.push(b'\n');
    body
}

/// The OperationOutcome lines of an export's error file: one warning per exported type.
fn error_lines(export: &Export) -> Vec<u8> {
    let mut types: Vec<&str> = export
        .files
        .iter()
        .map(|f| f.resource_type.as_str())
        .collect();
    types.dedup();
    let mut body = Vec::new();
    for resource_type in types {
        let line = json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "warning",
                "code": "processing",
                "diagnostics": format!("some {resource_type} resources could not be exported"),
            }],
        });
        body.extend_from_slice(line.to_string().as_bytes());
        body.push(b'\n');
    }
    body
}

/// `GET /fhir/Group/{id}`: the Group with its members (every patient for the built-in group),
/// for a client that compares a group's membership between runs.
pub(crate) async fn read_group(
    State(state): State<Arc<ServerState>>,
    Bearer(_token): Bearer,
    Path(id): Path<String>,
) -> Response {
    let members: Vec<usize> = match state.lock().groups.get(&id) {
        Some(members) => members.clone(),
        None if personality::group_ids(state.options.vendor).contains(&id.as_str()) => {
            (0..state.dataset.patients).collect()
        }
        None => {
            return outcome::error(
                StatusCode::NOT_FOUND,
                "not-found",
                "no Group with this id exists",
            );
        }
    };
    let member: Vec<serde_json::Value> = members
        .iter()
        .map(|&i| json!({ "entity": { "reference": format!("Patient/{}", state.dataset.id("Patient", i)) } }))
        .collect();
    let body = json!({
        "resourceType": "Group",
        "id": id,
        "type": "person",
        "actual": true,
        "quantity": member.len(),
        "member": member,
    });
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(outcome::FHIR_JSON),
        )],
        body.to_string(),
    )
        .into_response()
}

/// `DELETE /fhir/bulkstatus/{id}`: cancel, or clean up after a completed export.
pub(crate) async fn delete(
    State(state): State<Arc<ServerState>>,
    Bearer(token): Bearer,
    Path(id): Path<String>,
) -> Response {
    let mut inner = state.lock();
    let owned = inner
        .exports
        .get(&id)
        .is_some_and(|e| e.client_id == token.client_id);
    if !owned {
        return unknown_export();
    }
    if let Some(status) = state.options.faults.delete_status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::METHOD_NOT_ALLOWED);
        return outcome::error(
            status,
            "not-supported",
            "exports cannot be deleted on this server",
        );
    }
    inner.exports.remove(&id);
    outcome::operation_outcome(
        StatusCode::ACCEPTED,
        "information",
        "informational",
        "the export has been deleted",
    )
}

/// An export that does not exist, was deleted, or belongs to another client. The last case
/// gets a 404 too, so that one client cannot probe for another's exports.
fn unknown_export() -> Response {
    outcome::error(
        StatusCode::NOT_FOUND,
        "not-found",
        "no export with this id exists",
    )
}

/// Query of a file request: `sig` is the link generation the manifest handed out.
#[derive(serde::Deserialize)]
pub(crate) struct FileQuery {
    sig: Option<u32>,
    /// The file's name when the URL names it in the query (`Faults::query_string_parts`).
    part: Option<String>,
}

/// `GET /fhir/bulkfiles/{id}/{file}`.
pub(crate) async fn file(
    State(state): State<Arc<ServerState>>,
    Path((id, name)): Path<(String, String)>,
    Query(query): Query<FileQuery>,
    headers: HeaderMap,
) -> Response {
    let name = match &query.part {
        Some(part) if name == "data" => part.clone(),
        _ => name,
    };
    // When the manifest says no token is needed the files behave like presigned URLs: any
    // Authorization header is ignored rather than refused.
    let client_id = if state.options.requires_access_token {
        match auth::authorize(&state, &headers) {
            Ok(token) => Some(token.client_id),
            Err(unauthorized) => return unauthorized.into_response(),
        }
    } else {
        None
    };
    let faults = &state.options.faults;
    let (source, truncate, trickle) = {
        let mut inner = state.lock();
        let inner = &mut *inner;
        let Some(export) = inner
            .exports
            .get(&id)
            .filter(|e| client_id.as_ref().is_none_or(|c| *c == e.client_id))
        else {
            return no_such_file();
        };
        let extra = (0..faults.extra_files.len()).find(|n| extra_file_name(*n) == name);
        let failed = (0..export.failed_files).find(|n| failed_file_name(*n) == name);
        let source = if faults.error_file && name == ERROR_FILE {
            FileSource::Fixed(Some(Bytes::from(error_lines(export))))
        } else if let Some(n) = failed {
            FileSource::Fixed(Some(Bytes::from(failed_file_lines(&export.files[n]))))
        } else if let Some(n) = extra {
            FileSource::Fixed(Some(Bytes::from(faults.extra_files[n].1.clone())))
        } else if let Some(body) = faults
            .deleted_body
            .as_ref()
            .filter(|_| name == DELETED_FILE)
        {
            FileSource::Fixed(Some(Bytes::from(body.clone())))
        } else if faults.deleted_resources > 0 && name == DELETED_FILE {
            FileSource::Fixed(Some(Bytes::from(deleted_lines(faults.deleted_resources))))
        } else {
            let Some(file) = export.files.iter().find(|f| f.name == name) else {
                return no_such_file();
            };
            FileSource::Lines(FileLines {
                dataset: state.dataset.clone(),
                file: file.clone(),
                since: export.since,
                last_updated: personality::sends_last_updated(state.options.vendor),
                keep: export.keep.clone(),
                next_index: 0,
                written: 0,
                stop_after: None,
            })
        };
        let generation = inner.faults.link_generation;
        if query.sig.is_some_and(|sig| sig != generation) {
            return outcome::error(StatusCode::GONE, "expired", "this file link has expired");
        }
        if take(&mut inner.faults.expire_files, faults.expire_files) {
            inner.faults.link_generation += 1;
            return outcome::error(StatusCode::GONE, "expired", "this file link has expired");
        }
        if take(&mut inner.faults.file_429, faults.file_429) {
            return too_many_requests("too many file requests; slow down");
        }
        if take(&mut inner.faults.file_500, faults.file_500) {
            return outcome::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "the file store failed",
            );
        }
        let truncate = take(&mut inner.faults.truncate_file, faults.truncate_file);
        let trickle = take(&mut inner.faults.trickle_file, faults.trickle_file);
        inner.faults.open_files += 1;
        inner.faults.max_open_files = inner.faults.max_open_files.max(inner.faults.open_files);
        (source, truncate, trickle)
    };
    let source = match source {
        FileSource::Lines(mut lines) if truncate => {
            lines.stop_after = Some(lines.file.count / 2);
            FileSource::Lines(lines)
        }
        other => other,
    };
    tracing::debug!(truncate, "fake fhir server streaming an export file");
    let accepts = |coding: &str| {
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|e| e.trim().starts_with(coding)))
    };
    let gzip = faults.gzip && accepts("gzip");
    let deflate = !gzip && faults.deflate && accepts("deflate");
    let ranges = faults.range && !gzip && !deflate;
    let range = if ranges { range_start(&headers) } else { None };
    let total = match (&range, &source) {
        (Some(_), FileSource::Lines(lines)) => {
            // The whole file's length, even when this response will be cut short.
            let mut lines = lines.clone();
            lines.stop_after = None;
            let mut total = 0u64;
            loop {
                let chunk = lines.next_chunk();
                if chunk.is_empty() {
                    break total;
                }
                total += chunk.len() as u64;
            }
        }
        (_, FileSource::Fixed(bytes)) => bytes.as_ref().map_or(0, |b| b.len() as u64),
        (None, _) => 0,
    };
    if let Some(start) = range
        && start >= total
    {
        return outcome::error(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "invalid",
            "the range starts past the end of the file",
        );
    }
    let body = FileBody {
        source,
        encoder: if gzip {
            Some(Encoder::Gzip(GzEncoder::new(
                Vec::new(),
                Compression::fast(),
            )))
        } else if deflate {
            Some(Encoder::Deflate(flate2::write::ZlibEncoder::new(
                Vec::new(),
                Compression::fast(),
            )))
        } else {
            None
        },
        cut: truncate,
        trickle,
        done: false,
        skip: range.unwrap_or(0),
        _open: OpenFile(state.clone()),
    };
    let status = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut response = (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON))],
        Body::from_stream(body.into_stream()),
    )
        .into_response();
    if ranges {
        response
            .headers_mut()
            .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    if let Some(start) = range
        && let Ok(value) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", total - 1))
    {
        response.headers_mut().insert(header::CONTENT_RANGE, value);
    }
    if gzip {
        state.lock().faults.gzipped_files += 1;
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if deflate {
        state.lock().faults.deflated_files += 1;
        response.headers_mut().insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("deflate"),
        );
    }
    response
}

/// The start of a `Range: bytes=N-` header; other range forms are ignored (answered in full),
/// which the spec allows.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::RANGE)?.to_str().ok()?;
    let start = value.strip_prefix("bytes=")?.strip_suffix('-')?;
    start.parse().ok()
}

fn no_such_file() -> Response {
    outcome::error(StatusCode::NOT_FOUND, "not-found", "no such export file")
}

/// Counts a file body as open from the request until the body is dropped (fully sent, or the
/// connection gone), for the concurrent-download gauge.
struct OpenFile(Arc<ServerState>);

impl Drop for OpenFile {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.faults.open_files = inner.faults.open_files.saturating_sub(1);
    }
}

/// Where a file body's bytes come from.
enum FileSource {
    Lines(FileLines),
    /// A small body known up front (the error file); taken on the first chunk.
    Fixed(Option<Bytes>),
}

/// A content coding applied on the fly.
enum Encoder {
    Gzip(GzEncoder<Vec<u8>>),
    /// HTTP's `deflate` is the zlib format (RFC 9110 §8.4.1.2).
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
}

impl Encoder {
    fn encode(&mut self, chunk: &[u8]) -> std::io::Result<Bytes> {
        // A sync flush after each chunk, so the client can decode what it has so far.
        match self {
            Encoder::Gzip(e) => e
                .write_all(chunk)
                .and_then(|()| e.flush())
                .map(|()| Bytes::from(std::mem::take(e.get_mut()))),
            Encoder::Deflate(e) => e
                .write_all(chunk)
                .and_then(|()| e.flush())
                .map(|()| Bytes::from(std::mem::take(e.get_mut()))),
        }
    }

    fn finish(self) -> std::io::Result<Bytes> {
        match self {
            Encoder::Gzip(e) => e.finish().map(Bytes::from),
            Encoder::Deflate(e) => e.finish().map(Bytes::from),
        }
    }
}

/// A file body being streamed: the plain chunks, optionally compressed on the fly, and
/// optionally cut short with an error (which aborts the connection mid-body).
struct FileBody {
    source: FileSource,
    encoder: Option<Encoder>,
    cut: bool,
    /// After the first chunk, send one byte every 100 ms and never finish.
    trickle: bool,
    done: bool,
    /// Bytes still to drop from the front (a `Range` request's offset).
    skip: u64,
    _open: OpenFile,
}

impl FileBody {
    fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
        futures::stream::unfold(self, |mut body| async move {
            if body.done {
                if body.trickle {
                    // A trickle is the fault itself: the client must give up on it.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    return Some((Ok(Bytes::from_static(b" ")), body));
                }
                return None;
            }
            if body.trickle {
                body.done = true;
            }
            let mut chunk = match &mut body.source {
                FileSource::Lines(lines) => lines.next_chunk(),
                FileSource::Fixed(bytes) => bytes.take().unwrap_or_default(),
            };
            while body.skip > 0 && !chunk.is_empty() {
                let dropped = body.skip.min(chunk.len() as u64);
                body.skip -= dropped;
                chunk = chunk.slice(dropped as usize..);
                if chunk.is_empty() {
                    chunk = match &mut body.source {
                        FileSource::Lines(lines) => lines.next_chunk(),
                        FileSource::Fixed(bytes) => bytes.take().unwrap_or_default(),
                    };
                }
            }
            if chunk.is_empty() {
                body.done = true;
                if body.cut {
                    // Let the server flush the headers and the lines sent so far before the
                    // connection drops, so the client sees a body that breaks off midway
                    // rather than a response that never arrived.
                    tokio::task::yield_now().await;
                    return Some((
                        Err(std::io::Error::other("the fake cut the connection")),
                        body,
                    ));
                }
                let rest = match body.encoder.take() {
                    Some(encoder) => encoder.finish(),
                    None => return None,
                };
                return Some((rest, body));
            }
            let out = match &mut body.encoder {
                Some(encoder) => encoder.encode(&chunk),
                None => Ok(chunk),
            };
            Some((out, body))
        })
    }
}

/// The lines of one export file, generated on demand.
#[derive(Clone)]
struct FileLines {
    dataset: Dataset,
    file: ExportFile,
    since: Option<OffsetDateTime>,
    /// Whether lines carry `meta.lastUpdated` (Epic's personality leaves it out).
    last_updated: bool,
    keep: Arc<Keep>,
    /// Offset from `file.first_index` of the next resource to consider.
    next_index: usize,
    written: usize,
    /// Stop after this many lines (a truncated download).
    stop_after: Option<usize>,
}

impl FileLines {
    /// The next run of whole lines, about [`CHUNK_BYTES`] long; empty once the file is done.
    fn next_chunk(&mut self) -> Bytes {
        let total = self.dataset.count(&self.file.resource_type);
        let mut chunk = Vec::with_capacity(CHUNK_BYTES + 4 * 1024);
        let limit = self.stop_after.unwrap_or(usize::MAX).min(self.file.count);
        while self.written < limit && chunk.len() < CHUNK_BYTES {
            let index = self.file.first_index + self.next_index;
            if index >= total {
                // The plan never points past the data set; stopping short is the safe way to
                // fail if it ever does.
                break;
            }
            self.next_index += 1;
            let wanted = self.since.is_none_or(|since| {
                self.dataset.last_updated(&self.file.resource_type, index) > since
            }) && self
                .keep
                .keeps(&self.dataset, &self.file.resource_type, index);
            if wanted && !self.last_updated {
                let mut resource = self.dataset.resource(&self.file.resource_type, index);
                if let Some(meta) = resource.get_mut("meta").and_then(|m| m.as_object_mut()) {
                    meta.remove("lastUpdated");
                }
                // Serialising a `Value` cannot fail: all its map keys are strings.
                chunk.extend_from_slice(resource.to_string().as_bytes());
                chunk.push(b'\n');
                self.written += 1;
            } else if wanted {
                chunk.extend_from_slice(
                    self.dataset
                        .ndjson_line(&self.file.resource_type, index)
                        .as_bytes(),
                );
                chunk.push(b'\n');
                self.written += 1;
            }
        }
        Bytes::from(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::test_client::Harness;
    use crate::fake::{FakeOptions, RESOURCE_TYPES};
    use serde_json::Value;
    use std::collections::BTreeMap;

    fn fast_options() -> FakeOptions {
        FakeOptions {
            polls_before_ready: 2,
            retry_after_seconds: 0,
            resources_per_file: 25,
            ..FakeOptions::default()
        }
    }

    async fn outcome_of(response: reqwest::Response) -> Value {
        assert_eq!(response.headers()["content-type"], "application/fhir+json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome");
        body
    }

    /// Kicks off, polls until the manifest, and returns the status URL and the manifest.
    async fn run_export(h: &Harness, path_and_query: &str, token: &str) -> (String, Value) {
        let kick_off = h.kick_off(path_and_query, token).await;
        assert_eq!(kick_off.status(), 202, "{path_and_query}");
        let status_url = kick_off.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        let ready = h.server.options().polls_before_ready;
        for _ in 0..ready {
            let poll = h.get(&status_url, Some(token)).await;
            assert_eq!(poll.status(), 202);
        }
        let done = h.get(&status_url, Some(token)).await;
        assert_eq!(done.status(), 200);
        assert_eq!(done.headers()["content-type"], "application/json");
        (status_url, done.json().await.unwrap())
    }

    /// Downloads every file of a manifest and returns the lines per type, checking each file's
    /// line count against its manifest entry.
    async fn download_all(
        h: &Harness,
        manifest: &Value,
        token: Option<&str>,
    ) -> BTreeMap<String, Vec<String>> {
        let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in manifest["output"].as_array().unwrap() {
            let url = entry["url"].as_str().unwrap();
            let response = h.get(url, token).await;
            assert_eq!(response.status(), 200, "{url}");
            assert_eq!(response.headers()["content-type"], NDJSON);
            let body = response.text().await.unwrap();
            assert!(body.is_empty() || body.ends_with('\n'));
            let file_lines: Vec<String> = body.lines().map(str::to_string).collect();
            assert_eq!(
                file_lines.len() as u64,
                entry["count"].as_u64().unwrap(),
                "{url}"
            );
            let resource_type = entry["type"].as_str().unwrap().to_string();
            for line in &file_lines {
                let resource: Value = serde_json::from_str(line).unwrap();
                assert_eq!(resource["resourceType"], resource_type.as_str());
            }
            lines.entry(resource_type).or_default().extend(file_lines);
        }
        lines
    }

    #[tokio::test]
    async fn a_full_export_serves_the_whole_data_set() {
        let h = Harness::start(Dataset::new(77, 9), fast_options()).await;
        let token = h.token().await;
        let kick_off = h.kick_off("$export", &token).await;
        assert_eq!(kick_off.status(), 202);
        let status_url = kick_off.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        let base = h.server.fhir_base_url().to_string();
        assert!(
            status_url.starts_with(&format!("{base}/bulkstatus/")),
            "{status_url}"
        );

        for k in 1..=2 {
            let poll = h.get(&status_url, Some(&token)).await;
            assert_eq!(poll.status(), 202);
            assert_eq!(poll.headers()["retry-after"], "0");
            assert_eq!(
                poll.headers()["x-progress"],
                format!("in progress ({k}/2)").as_str()
            );
        }
        let done = h.get(&status_url, Some(&token)).await;
        assert_eq!(done.status(), 200);
        let manifest: Value = done.json().await.unwrap();
        assert_eq!(manifest["request"], format!("{base}/$export"));
        assert_eq!(manifest["requiresAccessToken"], true);
        assert_eq!(manifest["error"], serde_json::json!([]));
        let transaction_time = manifest["transactionTime"].as_str().unwrap();
        OffsetDateTime::parse(transaction_time, &Rfc3339).unwrap();
        let output = manifest["output"].as_array().unwrap();
        let counted: u64 = output.iter().map(|o| o["count"].as_u64().unwrap()).sum();
        assert_eq!(counted as usize, h.server.dataset().total());
        assert!(output.iter().all(|o| o["count"].as_u64().unwrap() <= 25));
        let order: Vec<&str> = output.iter().map(|o| o["type"].as_str().unwrap()).collect();
        let mut deduped = order.clone();
        deduped.dedup();
        assert_eq!(deduped, RESOURCE_TYPES);

        // Polling again keeps returning the manifest.
        assert_eq!(h.get(&status_url, Some(&token)).await.status(), 200);

        let lines = download_all(&h, &manifest, Some(&token)).await;
        let d = h.server.dataset();
        for t in RESOURCE_TYPES {
            let expected: Vec<String> = (0..d.count(t)).map(|i| d.ndjson_line(t, i)).collect();
            assert_eq!(lines[t], expected, "{t}");
        }
    }

    /// The first issue's diagnostics of an OperationOutcome response.
    async fn diagnostics_of(response: reqwest::Response) -> String {
        let body = outcome_of(response).await;
        assert_eq!(body["issue"][0]["severity"], "error");
        body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn kick_off_requires_the_async_headers() {
        let h = Harness::start(Dataset::new(1, 2), fast_options()).await;
        let token = h.token().await;
        let fhir_json = Some("application/fhir+json");
        let cases = [
            (fhir_json, None, "Prefer"),
            (fhir_json, Some("handling=lenient"), "Prefer"),
            (None, Some("respond-async"), "Accept"),
            (Some("application/json"), Some("respond-async"), "Accept"),
            (
                Some("application/fhir+json, application/json"),
                Some("respond-async"),
                "Accept",
            ),
        ];
        for (accept, prefer, named) in cases {
            let response = h
                .kick_off_with("$export", accept, prefer, Some(&token))
                .await;
            assert_eq!(response.status(), 400, "{accept:?} {prefer:?}");
            let diagnostics = diagnostics_of(response).await;
            assert!(diagnostics.contains(named), "{diagnostics}");
        }
        let lenient = h
            .kick_off_with(
                "$export",
                fhir_json,
                Some("respond-async, handling=lenient"),
                Some(&token),
            )
            .await;
        assert_eq!(lenient.status(), 202);
    }

    #[tokio::test]
    async fn protected_routes_need_a_valid_bearer() {
        let h = Harness::start(Dataset::new(1, 2), fast_options()).await;
        let anonymous = h
            .kick_off_with(
                "$export",
                Some("application/fhir+json"),
                Some("respond-async"),
                None,
            )
            .await;
        assert_eq!(anonymous.status(), 401);
        assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
        outcome_of(anonymous).await;

        let forged = h.kick_off("$export", "not-a-token-we-issued").await;
        assert_eq!(forged.status(), 401);
        assert!(
            forged.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token")
        );

        let token = h.token().await;
        let (status_url, manifest) = run_export(&h, "$export?_type=Patient", &token).await;
        assert_eq!(h.get(&status_url, None).await.status(), 401);
        let file_url = manifest["output"][0]["url"].as_str().unwrap();
        assert_eq!(h.get(file_url, None).await.status(), 401);
        assert_eq!(h.get(file_url, Some("nope")).await.status(), 401);
    }

    #[tokio::test]
    async fn expired_tokens_are_refused() {
        let options = FakeOptions {
            token_lifetime_seconds: 0,
            ..fast_options()
        };
        let h = Harness::start(Dataset::new(1, 2), options).await;
        let token = h.token().await;
        let response = h.kick_off("$export", &token).await;
        assert_eq!(response.status(), 401);
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.contains("invalid_token"), "{challenge}");
        assert!(diagnostics_of(response).await.contains("expired"));
    }

    #[tokio::test]
    async fn type_and_format_parameters_shape_the_export() {
        let h = Harness::start(Dataset::new(5, 4), fast_options()).await;
        let token = h.token().await;
        let (_, manifest) = run_export(
            &h,
            "$export?_type=Condition,Patient&_outputFormat=application%2Ffhir%2Bndjson&_elements=id",
            &token,
        )
        .await;
        let types: Vec<&str> = manifest["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Condition", "Patient"]);

        let (_, empty) =
            run_export(&h, "$export?_type=Medication&_outputFormat=ndjson", &token).await;
        assert_eq!(empty["output"], serde_json::json!([]));

        for bad in [
            "$export?_type=patient",
            "$export?_type=Patient,Not-A-Type",
            "$export?_outputFormat=text%2Fcsv",
            "$export?_outputFormat=application/fhir+ndjson",
            "$export?_since=yesterday",
        ] {
            let response = h.kick_off(bad, &token).await;
            assert_eq!(response.status(), 400, "{bad}");
            let body = outcome_of(response).await;
            assert_eq!(body["issue"][0]["code"], "invalid");
        }
    }

    #[tokio::test]
    async fn since_exports_only_newer_resources() {
        let h = Harness::start(Dataset::new(8, 12), fast_options()).await;
        let token = h.token().await;
        // 2025-01-01T02:00:00+02:00 is midnight UTC; the offset must arrive percent-encoded.
        let since = OffsetDateTime::parse("2025-01-01T00:00:00Z", &Rfc3339).unwrap();
        let (_, manifest) =
            run_export(&h, "$export?_since=2025-01-01T02:00:00%2B02:00", &token).await;
        let lines = download_all(&h, &manifest, Some(&token)).await;
        let d = h.server.dataset();
        let mut filtered_total = 0;
        for t in RESOURCE_TYPES {
            let expected: Vec<String> = (0..d.count(t))
                .filter(|i| d.last_updated(t, *i) > since)
                .map(|i| d.ndjson_line(t, i))
                .collect();
            assert!(!expected.is_empty() && expected.len() < d.count(t), "{t}");
            filtered_total += expected.len();
            assert_eq!(lines.get(t).cloned().unwrap_or_default(), expected, "{t}");
        }
        let counted: u64 = manifest["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["count"].as_u64().unwrap())
            .sum();
        assert_eq!(counted as usize, filtered_total);
    }

    #[tokio::test]
    async fn delete_forgets_the_export() {
        let h = Harness::start(Dataset::new(3, 2), fast_options()).await;
        let token = h.token().await;
        let (status_url, manifest) = run_export(&h, "$export", &token).await;
        assert_eq!(h.server.export_count(), 1);
        let deleted = h.delete(&status_url, &token).await;
        assert_eq!(deleted.status(), 202);
        assert_eq!(h.server.export_count(), 0);
        let gone = h.get(&status_url, Some(&token)).await;
        assert_eq!(gone.status(), 404);
        outcome_of(gone).await;
        let file_url = manifest["output"][0]["url"].as_str().unwrap();
        assert_eq!(h.get(file_url, Some(&token)).await.status(), 404);
        let again = h.delete(&status_url, &token).await;
        assert_eq!(again.status(), 404);
    }

    #[tokio::test]
    async fn unknown_exports_and_files_are_not_found() {
        let h = Harness::start(Dataset::new(3, 2), fast_options()).await;
        let token = h.token().await;
        let base = h.server.fhir_base_url();
        let unknown = h
            .get(&format!("{base}/bulkstatus/no-such-export"), Some(&token))
            .await;
        assert_eq!(unknown.status(), 404);
        outcome_of(unknown).await;
        let (status_url, _) = run_export(&h, "$export?_type=Patient", &token).await;
        let id = status_url.rsplit('/').next().unwrap();
        for name in ["Patient-2.ndjson", "Observation-1.ndjson", "Patient-1.json"] {
            let response = h
                .get(&format!("{base}/bulkfiles/{id}/{name}"), Some(&token))
                .await;
            assert_eq!(response.status(), 404, "{name}");
        }
    }

    #[tokio::test]
    async fn files_without_required_token_accept_any_or_no_bearer() {
        let options = FakeOptions {
            requires_access_token: false,
            ..fast_options()
        };
        let h = Harness::start(Dataset::new(6, 3), options).await;
        let token = h.token().await;
        let (_, manifest) = run_export(&h, "$export", &token).await;
        assert_eq!(manifest["requiresAccessToken"], false);
        let without = download_all(&h, &manifest, None).await;
        let with = download_all(&h, &manifest, Some(&token)).await;
        assert_eq!(without, with);
        assert_eq!(
            without.values().map(Vec::len).sum::<usize>(),
            h.server.dataset().total()
        );
    }

    #[tokio::test]
    async fn scopes_limit_what_can_be_exported() {
        let h = Harness::start(Dataset::new(2, 2), fast_options()).await;
        let patients_only = h.token_with_scope("system/Patient.rs").await;
        let denied = h
            .kick_off("$export?_type=Patient,Observation", &patients_only)
            .await;
        assert_eq!(denied.status(), 403);
        assert!(diagnostics_of(denied).await.contains("Observation"));
        let (_, manifest) = run_export(&h, "$export", &patients_only).await;
        let types: Vec<&str> = manifest["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Patient"]);
    }

    #[tokio::test]
    async fn another_clients_token_cannot_see_an_export() {
        use crate::fake::test_client::{TestKey, claims, post_token};
        let h = Harness::start(Dataset::new(2, 2), fast_options()).await;
        let token = h.token().await;
        let other = TestKey::ec("other");
        h.server.register_client("other-client", other.jwks());
        let assertion = other.sign(&claims("other-client", h.server.token_url().as_str(), 60));
        let response = post_token(&h.http, &h.server, &assertion, "system/*.read").await;
        let other_token = response.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        let kick_off = h.kick_off("$export", &token).await;
        let status_url = kick_off.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(h.get(&status_url, Some(&other_token)).await.status(), 404);
        assert_eq!(h.get(&status_url, Some(&token)).await.status(), 202);
    }

    #[tokio::test]
    async fn patient_and_group_level_exports_work() {
        let h = Harness::start(Dataset::new(2, 3), fast_options()).await;
        let token = h.token().await;
        let group = format!("Group/{ALL_PATIENTS_GROUP_ID}/$export?_type=Patient");
        for path in ["Patient/$export?_type=Patient", group.as_str()] {
            let (_, manifest) = run_export(&h, path, &token).await;
            assert_eq!(manifest["output"][0]["count"], 3, "{path}");
            assert_eq!(
                manifest["request"],
                format!("{}/{path}", h.server.fhir_base_url())
            );
        }
        let missing = h.kick_off("Group/nope/$export", &token).await;
        assert_eq!(missing.status(), 404);
    }

    #[tokio::test]
    async fn scripted_manifests_list_error_and_deleted_files_and_page() {
        use crate::fake::Faults;
        let options = FakeOptions {
            faults: Faults::default()
                .error_file()
                .deleted_resources(2)
                .relative_urls()
                .manifest_page_size(1),
            ..fast_options()
        };
        let h = Harness::start(Dataset::new(1, 2), options).await;
        let token = h.token().await;
        let (status_url, manifest) =
            run_export(&h, "$export?_type=Patient,Condition", &token).await;
        assert_eq!(manifest["output"].as_array().unwrap().len(), 1);
        let next = manifest["link"][0]["url"].as_str().unwrap();
        assert_eq!(next, format!("{status_url}?page=2"));
        let page: Value = h.get(next, Some(&token)).await.json().await.unwrap();
        assert_eq!(page["output"][0]["type"], "Condition");
        assert!(page.get("link").is_none(), "the last page links no further");

        let base = url::Url::parse(&status_url).unwrap();
        let absolute = |entry: &Value| base.join(entry["url"].as_str().unwrap()).unwrap();
        let errors = h
            .get(absolute(&manifest["error"][0]).as_str(), Some(&token))
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(errors.lines().count(), 2, "one outcome per exported type");
        assert_eq!(manifest["deleted"][0]["type"], "Bundle");
        let deleted = h
            .get(absolute(&manifest["deleted"][0]).as_str(), Some(&token))
            .await
            .text()
            .await
            .unwrap();
        let bundle: Value = serde_json::from_str(deleted.trim_end()).unwrap();
        assert_eq!(bundle["type"], "transaction");
        assert_eq!(bundle["entry"][1]["request"]["method"], "DELETE");
        assert_eq!(bundle["entry"][1]["request"]["url"], "Patient/deleted-2");
    }

    #[test]
    fn plans_split_by_file_size_in_type_order() {
        let d = Dataset::new(1, 10);
        let types = vec!["Observation".to_string(), "Patient".to_string()];
        let files = plan_files(&d, &types, None, 50);
        let summary: Vec<(&str, &str, usize, usize)> = files
            .iter()
            .map(|f| {
                (
                    f.resource_type.as_str(),
                    f.name.as_str(),
                    f.first_index,
                    f.count,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("Observation", "Observation-1.ndjson", 0, 50),
                ("Observation", "Observation-2.ndjson", 50, 50),
                ("Observation", "Observation-3.ndjson", 100, 20),
                ("Patient", "Patient-1.ndjson", 0, 10),
            ]
        );
    }

    #[test]
    fn types_without_data_get_no_file() {
        let d = Dataset::new(1, 3);
        let files = plan_files(&d, &["Medication".to_string()], None, 10);
        assert!(files.is_empty());
        assert!(plan_files(&Dataset::new(1, 0), &["Patient".to_string()], None, 10).is_empty());
    }

    #[test]
    fn since_plans_count_only_newer_resources() {
        let d = Dataset::new(4, 20);
        let since = OffsetDateTime::parse("2025-01-01T00:00:00Z", &Rfc3339).unwrap();
        let expected = (0..d.count("Encounter"))
            .filter(|i| d.last_updated("Encounter", *i) > since)
            .count();
        assert!(expected > 0 && expected < d.count("Encounter"));
        let files = plan_files(&d, &["Encounter".to_string()], Some(since), 7);
        assert_eq!(files.iter().map(|f| f.count).sum::<usize>(), expected);
        assert!(files.iter().all(|f| f.count <= 7));
    }

    #[test]
    fn streamed_chunks_hold_exactly_the_planned_lines() {
        let d = Dataset::new(2, 40);
        let since = OffsetDateTime::parse("2024-09-01T00:00:00+02:00", &Rfc3339).unwrap();
        for since in [None, Some(since)] {
            for file in plan_files(&d, &["Observation".to_string()], since, 200) {
                let mut lines = FileLines {
                    dataset: d.clone(),
                    file: file.clone(),
                    since,
                    last_updated: true,
                    keep: Default::default(),
                    next_index: 0,
                    written: 0,
                    stop_after: None,
                };
                let mut body = Vec::new();
                let mut chunks = 0;
                loop {
                    let chunk = lines.next_chunk();
                    if chunk.is_empty() {
                        break;
                    }
                    assert!(chunk.len() < CHUNK_BYTES + 4 * 1024);
                    assert!(chunk.ends_with(b"\n"), "chunks end on a line boundary");
                    chunks += 1;
                    body.extend_from_slice(&chunk);
                }
                let text = String::from_utf8(body).unwrap();
                assert_eq!(text.lines().count(), file.count);
                assert!(
                    file.count < 200 || chunks > 1,
                    "a full file spans several chunks"
                );
            }
        }
    }

    #[test]
    fn kick_off_parameters_are_validated() {
        let ok = KickOffParams::parse("_type=Patient,Observation&_type=Patient&_outputFormat=application%2Ffhir%2Bndjson&_elements=id&foo=bar").unwrap();
        assert_eq!(ok.types.unwrap(), ["Patient", "Observation"]);
        let since = KickOffParams::parse("_since=2024-06-01T00:00:00%2B05:00").unwrap();
        assert_eq!(
            since.since,
            Some(OffsetDateTime::parse("2024-06-01T00:00:00+05:00", &Rfc3339).unwrap())
        );
        assert_eq!(
            KickOffParams::parse("").unwrap(),
            KickOffParams {
                types: None,
                since: None,
                patients: Vec::new(),
            }
        );
        for bad in [
            "_type=patient",
            "_type=Patient,,Observation",
            "_type=Obs%20ervation",
            "_outputFormat=application/fhir+ndjson",
            "_outputFormat=application/json",
            "_since=2024-06-01",
            "_since=2024-06-01T00:00:00+05:00",
            "_since=2999-01-01T00:00:00Z",
            "_since=2024-06-01T00:00:00Z&_since=2024-06-02T00:00:00Z",
        ] {
            assert!(
                KickOffParams::parse(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }
}
