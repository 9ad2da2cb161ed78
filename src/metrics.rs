//! The metrics recorder: the process's Prometheus counters and histograms, recorded where
//! things happen through the small functions below (one line per call site). A leaf: it
//! imports nothing of the crate, so `smart`, `bulk`, `warehouse` and `sync` record without
//! reaching into `ops`, which serves `/metrics` and adds the database gauges at scrape time.
//!
//! Names follow `fhir_sync_<name>_<unit>[_total]`. Labels are low-cardinality only: job names
//! (from configuration), resource types, endpoint kinds, status classes. Never a run id, a file
//! id or a URL: those would grow without bound and URLs may carry credentials.
//!
//! The recorder is global (the `metrics` facade), installed once per process by [`install`];
//! until then every recording function is a no-op, so commands that never serve `/metrics`
//! pay nothing.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Run durations: a tiny export takes seconds, a full one of a large EHR takes hours.
const RUN_DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
    28800.0, 57600.0, 86400.0,
];

/// Request latencies to response headers: milliseconds for a status poll, up to minutes for a
/// kick-off or a file whose server prepares it on demand.
const REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// How often histogram samples are folded into buckets when nobody scrapes; a scrape does it
/// too. Without it an unscraped process would keep every latency sample in memory.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle). `serve`
/// calls it at start-up, and tests call it before driving runs.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("fhir_sync_run_duration_seconds".into()),
                RUN_DURATION_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("fhir_sync_http_request_duration_seconds".into()),
                    REQUEST_DURATION_BUCKETS,
                )
            })
            .expect("the bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(e) = metrics::set_global_recorder(recorder) {
            // Another recorder (a program embedding the library) owns the facade; /metrics
            // then shows only the database gauges.
            tracing::warn!(error = %e, "a metrics recorder is installed already; process metrics are not exported");
        }
        describe();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("fhir-sync-metrics".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread; scrapes still fold samples");
        }
        handle
    })
}

fn describe() {
    describe_counter!(
        "fhir_sync_runs_started_total",
        "Runs created (queued): manual, scheduled and catch-up; skipped ticks are not runs"
    );
    describe_counter!(
        "fhir_sync_runs_finished_total",
        "Runs that ended, by status: succeeded, failed, cancelled, skipped"
    );
    describe_histogram!(
        "fhir_sync_run_duration_seconds",
        "Time from a run's creation to its end (skipped ticks are not observed)"
    );
    describe_counter!(
        "fhir_sync_resources_loaded_total",
        "Resources of output files committed to the warehouse"
    );
    describe_counter!(
        "fhir_sync_lines_rejected_total",
        "NDJSON lines rejected and recorded in fhir_sync.rejected_line"
    );
    describe_counter!(
        "fhir_sync_deletes_applied_total",
        "Deletion entries of the manifests' deleted files applied to the warehouse"
    );
    describe_counter!(
        "fhir_sync_export_errors_total",
        "OperationOutcomes of the manifests' error files stored in fhir_sync.export_error"
    );
    describe_counter!(
        "fhir_sync_download_bytes_total",
        "Bytes of export files received (after Content-Encoding decoding)"
    );
    describe_counter!(
        "fhir_sync_http_requests_total",
        "Requests to FHIR servers by endpoint kind and outcome (status class, 429, network_error)"
    );
    describe_histogram!(
        "fhir_sync_http_request_duration_seconds",
        "Time from sending a request to a FHIR server to its response headers"
    );
    describe_counter!(
        "fhir_sync_http_retries_total",
        "Requests to FHIR servers repeated after a 429, a 5xx, a network error, a broken-off body or a 401 that renewed the token"
    );
    describe_counter!(
        "fhir_sync_token_requests_total",
        "Access token requests (each may take several HTTP attempts), by reason and outcome"
    );
}

/// The FHIR server endpoint kinds requests are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `.well-known/smart-configuration` and the CapabilityStatement.
    Discovery,
    Token,
    KickOff,
    /// The export's status URL (polls, and the manifest it returns).
    Status,
    /// Further pages of a manifest.
    Manifest,
    File,
    /// The DELETE of an export.
    Delete,
    /// The read of a Group's members (`GET Group/{id}`).
    Group,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Discovery => "discovery",
            Endpoint::Token => "token",
            Endpoint::KickOff => "kickoff",
            Endpoint::Status => "status",
            Endpoint::Manifest => "manifest",
            Endpoint::File => "file",
            Endpoint::Delete => "delete",
            Endpoint::Group => "group",
        }
    }
}

/// The `outcome` label of an HTTP response: its status class, with 429 on its own (the number
/// that tells a server is throttling us). `None` is a request that got no response.
pub fn http_outcome(status: Option<u16>) -> &'static str {
    match status {
        None => "network_error",
        Some(429) => "429",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
    }
}

/// Why a token was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenReason {
    /// The first token of a run's token manager.
    Initial,
    /// The cached token was near its expiry.
    Refresh,
    /// The server refused the cached token with a 401.
    RenewAfter401,
}

impl TokenReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenReason::Initial => "initial",
            TokenReason::Refresh => "refresh",
            TokenReason::RenewAfter401 => "renew_after_401",
        }
    }
}

/// A run was created (queued).
pub fn run_started(job: &str) {
    counter!("fhir_sync_runs_started_total", "job" => job.to_owned()).increment(1);
}

/// A run ended with `status` (`succeeded`, `failed`, `cancelled`) after `duration_seconds`
/// since its creation. Called only by the one statement that moved the run to its end, so a
/// run is counted once however many processes worked on it.
pub fn run_finished(job: &str, status: &'static str, duration_seconds: f64) {
    counter!("fhir_sync_runs_finished_total", "job" => job.to_owned(), "status" => status)
        .increment(1);
    histogram!("fhir_sync_run_duration_seconds", "job" => job.to_owned(), "status" => status)
        .record(duration_seconds.max(0.0));
}

/// A cron tick was recorded as skipped because the job's previous run was still going.
pub fn run_skipped(job: &str) {
    counter!("fhir_sync_runs_finished_total", "job" => job.to_owned(), "status" => "skipped")
        .increment(1);
}

/// What a committed batch's rows were, which decides the counter they go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchRows {
    /// Resources of an output file.
    Resources,
    /// OperationOutcomes of an error file.
    Outcomes,
    /// Deletion Bundles, counted per entry by the type each entry deletes.
    Deletions,
}

/// One batch of a file was committed: its rows, rejected lines and deletions are in the
/// warehouse for good.
pub fn batch_committed(
    job: &str,
    kind: BatchRows,
    resource_type: &str,
    rows: u64,
    rejected: u64,
    deleted_types: &[String],
) {
    if rows > 0 {
        match kind {
            BatchRows::Resources => counter!(
                "fhir_sync_resources_loaded_total",
                "job" => job.to_owned(),
                "resource_type" => resource_type.to_owned()
            )
            .increment(rows),
            BatchRows::Outcomes => {
                counter!("fhir_sync_export_errors_total", "job" => job.to_owned()).increment(rows)
            }
            // Deletion Bundles are counted per entry, by the type each entry deletes.
            BatchRows::Deletions => {}
        }
    }
    if rejected > 0 {
        counter!(
            "fhir_sync_lines_rejected_total",
            "job" => job.to_owned(),
            "resource_type" => resource_type.to_owned()
        )
        .increment(rejected);
    }
    let mut by_type: BTreeMap<&str, u64> = BTreeMap::new();
    for deleted in deleted_types {
        *by_type.entry(deleted.as_str()).or_default() += 1;
    }
    for (resource_type, count) in by_type {
        counter!(
            "fhir_sync_deletes_applied_total",
            "job" => job.to_owned(),
            "resource_type" => resource_type.to_owned()
        )
        .increment(count);
    }
}

/// The byte counter of a job's downloads, resolved once per file so that counting a chunk is
/// one atomic add.
pub fn download_bytes(job: &str) -> Counter {
    counter!("fhir_sync_download_bytes_total", "job" => job.to_owned())
}

/// One request to a FHIR server ended: `status` is the response's, `None` when no response
/// came (connection refused or reset, timeout).
pub fn http_request(job: &str, endpoint: Endpoint, status: Option<u16>, elapsed: Duration) {
    counter!(
        "fhir_sync_http_requests_total",
        "job" => job.to_owned(),
        "endpoint" => endpoint.as_str(),
        "outcome" => http_outcome(status)
    )
    .increment(1);
    histogram!(
        "fhir_sync_http_request_duration_seconds",
        "job" => job.to_owned(),
        "endpoint" => endpoint.as_str()
    )
    .record(elapsed.as_secs_f64());
}

/// A request to a FHIR server is repeated (after a 429, a 5xx, a dropped connection, a 401
/// that renewed the token, a broken-off file body).
pub fn http_retry(job: &str, endpoint: Endpoint) {
    counter!(
        "fhir_sync_http_retries_total",
        "job" => job.to_owned(),
        "endpoint" => endpoint.as_str()
    )
    .increment(1);
}

/// A token request (with its own retries) ended.
pub fn token_request(job: &str, reason: TokenReason, succeeded: bool) {
    counter!(
        "fhir_sync_token_requests_total",
        "job" => job.to_owned(),
        "reason" => reason.as_str(),
        "outcome" => if succeeded { "succeeded" } else { "failed" }
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_outcome_classes() {
        let cases = [
            (Some(200), "2xx"),
            (Some(202), "2xx"),
            (Some(206), "2xx"),
            (Some(301), "3xx"),
            (Some(307), "3xx"),
            (Some(400), "4xx"),
            (Some(401), "4xx"),
            (Some(404), "4xx"),
            (Some(410), "4xx"),
            (Some(429), "429"),
            (Some(500), "5xx"),
            (Some(503), "5xx"),
            (Some(101), "other"),
            (Some(600), "other"),
            (None, "network_error"),
        ];
        for (status, outcome) in cases {
            assert_eq!(http_outcome(status), outcome, "{status:?}");
        }
    }

    #[test]
    fn endpoint_and_reason_labels() {
        let endpoints = [
            Endpoint::Discovery,
            Endpoint::Token,
            Endpoint::KickOff,
            Endpoint::Status,
            Endpoint::Manifest,
            Endpoint::File,
            Endpoint::Delete,
        ]
        .map(Endpoint::as_str);
        assert_eq!(
            endpoints,
            [
                "discovery",
                "token",
                "kickoff",
                "status",
                "manifest",
                "file",
                "delete"
            ]
        );
        let reasons = [
            TokenReason::Initial,
            TokenReason::Refresh,
            TokenReason::RenewAfter401,
        ]
        .map(TokenReason::as_str);
        assert_eq!(reasons, ["initial", "refresh", "renew_after_401"]);
    }
}
