//! One file's download into the loader: the per-file retry loop (429, 5xx, cut connections,
//! truncated bodies, downloads slower than `sync.min_download_bytes_per_second`), `Range`
//! resumption, fresh links after an expired one, and the size cap.
//!
//! Each attempt restarts the download and the loader skips the lines it already committed, so
//! nothing is loaded twice. This loop is the one place a file request is retried: its failure
//! reaches the step already retried and fails the run (see [`super::policy`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use tokio_util::io::StreamReader;

use super::{SyncError, error_chain};
use crate::bulk::{BulkClient, ExportError, Manifest, ManifestFile};
use crate::config::SyncSettings;
use crate::metrics::{self, Endpoint};
use crate::transport;
use crate::warehouse::{self, FileKind, FileTarget, LoadError, LoadLimits, runs};

/// Times one file's link may be refreshed from the status URL before the run gives up on it.
const MAX_LINK_REFRESHES: u32 = 3;

/// Byte-range resumptions of one download attempt before the attempt is given up.
const MAX_RANGE_RESUMES: u32 = 3;

/// What a file's download needs of its run.
pub(crate) struct Download<'a> {
    pub pool: &'a PgPool,
    pub bulk: &'a BulkClient,
    pub status_url: &'a url::Url,
    pub requires_access_token: bool,
    pub settings: &'a SyncSettings,
    /// Requests repeated, added to the run's count by the caller.
    pub retries: &'a AtomicU64,
}

/// The slowest a download may be: `bytes_per_second` averaged over each `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Throughput {
    bytes_per_second: u64,
    window: Duration,
}

impl Throughput {
    fn from_settings(settings: &SyncSettings) -> Option<Throughput> {
        (settings.min_download_bytes_per_second > 0).then(|| Throughput {
            bytes_per_second: settings.min_download_bytes_per_second,
            window: Duration::from_secs(settings.download_window_seconds.max(1)),
        })
    }

    /// Whether `bytes` received over `elapsed` (a full window or more) is too slow.
    fn too_slow(&self, bytes: u64, elapsed: Duration) -> bool {
        elapsed >= self.window
            && (bytes as f64) < self.bytes_per_second as f64 * elapsed.as_secs_f64()
    }
}

impl Download<'_> {
    /// Downloads and loads one file, retrying what may pass with backoff and fetching fresh
    /// links from the status URL when the file's link has expired.
    pub(crate) async fn load_file(
        &self,
        target: FileTarget,
        listed: &ManifestFile,
        kind: FileKind,
        position: Option<i32>,
    ) -> Result<(), SyncError> {
        let mut file = listed.clone();
        let name = transport::redacted(&file.url);
        runs::file_started(self.pool, target.file_id).await?;
        let policy = self.bulk.retry_policy();
        let mut attempt = 0;
        let mut refreshes = 0;
        loop {
            attempt += 1;
            runs::file_attempt(self.pool, target.file_id).await?;
            let bytes = AtomicU64::new(0);
            let result = self.download_and_load(&target, &file, &bytes).await;
            let read = bytes.load(Ordering::Relaxed);
            let error = match result {
                Ok(stats) => {
                    runs::file_loaded(self.pool, target.file_id, read).await?;
                    if let Some(mismatch) = &stats.count_mismatch {
                        tracing::warn!(
                            manifest.count = file.count,
                            mismatch = %mismatch,
                            "the file's line count differs from the manifest's count"
                        );
                    }
                    tracing::info!(
                        lines = stats.resumed_after_line + stats.lines,
                        loaded = stats.loaded,
                        rejected = stats.rejected,
                        bytes = read,
                        attempts = attempt,
                        "file loaded"
                    );
                    return Ok(());
                }
                // Another loader holds the file now: nothing to record, nothing to retry.
                Err(
                    error @ SyncError::Load {
                        source: LoadError::Superseded { .. },
                        ..
                    },
                ) => return Err(error),
                Err(error) => error,
            };
            let expired = matches!(
                &error,
                SyncError::Download {
                    source: ExportError::Expired { .. },
                    ..
                }
            );
            if expired && refreshes < MAX_LINK_REFRESHES {
                refreshes += 1;
                tracing::warn!(file = %name, "the file link expired; fetching fresh links from the status URL");
                let fresh = self.bulk.refresh_manifest(self.status_url).await;
                let failure = match fresh.map(|m| find_fresh_link(&m, listed, kind, position)) {
                    Ok(Some(url)) => {
                        runs::link_refreshed(self.pool, target.file_id, &url).await?;
                        file.url = url;
                        // A fresh link is a new chance: it does not use up a retry.
                        attempt -= 1;
                        continue;
                    }
                    Ok(None) => SyncError::Download {
                        file: name.clone(),
                        source: ExportError::BadResponse(
                            "the file link expired and the refreshed manifest no longer lists the file".into(),
                        ),
                    },
                    Err(source) => SyncError::Export(source),
                };
                runs::file_failed(self.pool, target.file_id, read, &error_chain(&failure)).await?;
                return Err(failure);
            }
            if !expired && error.is_retryable() && attempt < policy.attempts {
                let hinted = match &error {
                    SyncError::Download {
                        source: ExportError::FileStatus { retry_after, .. },
                        ..
                    } => *retry_after,
                    _ => None,
                };
                let delay = policy.delay(attempt, hinted);
                self.retries.fetch_add(1, Ordering::Relaxed);
                metrics::http_retry(self.bulk.job(), Endpoint::File);
                tracing::warn!(error = %error_chain(&error), attempt, retry_in_ms = delay.as_millis() as u64, "file failed, retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
            let error = if expired {
                let last = match &error {
                    SyncError::Download { source, .. } => source.to_string(),
                    other => other.to_string(),
                };
                SyncError::Download {
                    file: name.clone(),
                    source: ExportError::BadResponse(format!(
                        "the file link kept expiring ({MAX_LINK_REFRESHES} fresh links tried; the last answer: {last}); the server may be dropping the export's files"
                    )),
                }
            } else {
                error
            };
            runs::file_failed(self.pool, target.file_id, read, &error_chain(&error)).await?;
            tracing::warn!(error = %error_chain(&error), file = %name, "file failed");
            return Err(error);
        }
    }

    async fn download_and_load(
        &self,
        target: &FileTarget,
        file: &ManifestFile,
        bytes: &AtomicU64,
    ) -> Result<warehouse::LoadStats, SyncError> {
        let name = transport::redacted(&file.url);
        let download_error = |source| SyncError::Download {
            file: name.clone(),
            source,
        };
        let response = self
            .bulk
            .open_file(file, self.requires_access_token)
            .await
            .map_err(download_error)?;
        let limit = self.settings.max_file_bytes;
        if response
            .content_length()
            .is_some_and(|length| length > limit)
        {
            return Err(download_error(ExportError::TooLarge { limit }));
        }
        let too_large = AtomicBool::new(false);
        let too_slow = AtomicBool::new(false);
        // A server that says it takes byte ranges (and is not compressing, which would make
        // offsets ambiguous) gets a `Range` request when the body breaks off, and the loader
        // reads on as if nothing happened. Otherwise a break fails this attempt and the retry
        // restarts the file, the loader skipping the lines it has committed.
        let resumable = response
            .headers()
            .get(reqwest::header::ACCEPT_RANGES)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"bytes"))
            && !response
                .headers()
                .contains_key(reqwest::header::CONTENT_ENCODING);
        let resume = Resume {
            current: Box::pin(response.bytes_stream()),
            offset: 0,
            resumes_left: if resumable { MAX_RANGE_RESUMES } else { 0 },
        };
        let stream = futures::stream::unfold(resume, |mut resume| async move {
            loop {
                let error = match resume.current.next().await {
                    Some(Ok(chunk)) => {
                        resume.offset += chunk.len() as u64;
                        return Some((Ok(chunk), resume));
                    }
                    None => return None,
                    Some(Err(error)) => std::io::Error::other(error.without_url()),
                };
                if resume.resumes_left == 0 {
                    return Some((Err(error), resume));
                }
                resume.resumes_left -= 1;
                self.retries.fetch_add(1, Ordering::Relaxed);
                metrics::http_retry(self.bulk.job(), Endpoint::File);
                tracing::warn!(
                    offset = resume.offset,
                    "file body broke off; resuming with a Range request"
                );
                match self
                    .bulk
                    .resume_file(file, self.requires_access_token, resume.offset)
                    .await
                {
                    Ok(response) => resume.current = Box::pin(response.bytes_stream()),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not resume the file; it will be restarted");
                        resume.resumes_left = 0;
                        return Some((Err(error), resume));
                    }
                }
            }
        });
        // `bytes` counts what arrived (decompressed, since reqwest decodes gzip); past the cap
        // the stream fails so the loader stops reading. Every read may arrive on time while
        // the file never ends (a server that trickles): the throughput over each window ends
        // that attempt, and the retry goes on from the committed lines.
        let downloaded = metrics::download_bytes(self.bulk.job());
        let throughput = Throughput::from_settings(self.settings);
        let mut window = (Instant::now(), 0u64);
        let stream = Box::pin(stream).and_then(|chunk| {
            downloaded.increment(chunk.len() as u64);
            let total = bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            window.1 += chunk.len() as u64;
            let result = if total > limit {
                too_large.store(true, Ordering::Relaxed);
                Err(std::io::Error::other(
                    "the file is larger than sync.max_file_bytes",
                ))
            } else if let Some(min) = throughput
                && window.0.elapsed() >= min.window
            {
                if min.too_slow(window.1, window.0.elapsed()) {
                    too_slow.store(true, Ordering::Relaxed);
                    Err(std::io::Error::other(
                        "the download is slower than sync.min_download_bytes_per_second",
                    ))
                } else {
                    window = (Instant::now(), 0);
                    Ok(chunk)
                }
            } else {
                Ok(chunk)
            };
            futures::future::ready(result)
        });
        let reader = tokio::io::BufReader::with_capacity(256 * 1024, StreamReader::new(stream));
        let limits = LoadLimits {
            batch_lines: self.settings.batch_lines,
            max_line_bytes: self.settings.max_line_bytes,
        };
        let result = warehouse::load_ndjson(self.pool, target, reader, limits).await;
        if too_large.load(Ordering::Relaxed) {
            return Err(download_error(ExportError::TooLarge { limit }));
        }
        if too_slow.load(Ordering::Relaxed) {
            return Err(download_error(ExportError::TooSlow {
                minimum: self.settings.min_download_bytes_per_second,
                window_seconds: self.settings.download_window_seconds,
            }));
        }
        result.map_err(|source| SyncError::Load { file: name, source })
    }
}

/// The state of a file body that may be resumed with `Range` requests.
struct Resume {
    current: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    /// Bytes of the body received so far.
    offset: u64,
    resumes_left: u32,
}

/// The fresh URL of `listed` in a re-fetched manifest: the one entry with the same URL
/// without its query string (expiring links usually differ only in their signature), else —
/// when none or several share it (`data?part=1`, `data?part=2`) — the entry at the file's
/// place among the same kind's files.
fn find_fresh_link(
    fresh: &Manifest,
    listed: &ManifestFile,
    kind: FileKind,
    position: Option<i32>,
) -> Option<url::Url> {
    let list = match kind {
        FileKind::Output => &fresh.output,
        FileKind::Error => &fresh.error,
        FileKind::Deleted => &fresh.deleted,
    };
    let key = transport::redacted(&listed.url);
    let same: Vec<&ManifestFile> = list
        .iter()
        .filter(|f| transport::redacted(&f.url) == key)
        .collect();
    if let [only] = same.as_slice() {
        return Some(only.url.clone());
    }
    let at = list.get(usize::try_from(position?).ok()?)?;
    (same.is_empty() || transport::redacted(&at.url) == key).then(|| at.url.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str) -> ManifestFile {
        ManifestFile {
            resource_type: "Patient".into(),
            url: url::Url::parse(url).unwrap(),
            count: None,
        }
    }

    fn manifest(output: &[&str]) -> Manifest {
        let body = serde_json::json!({
            "transactionTime": "2024-01-01T00:00:00Z",
            "request": "https://ehr.example.org/fhir/$export",
            "requiresAccessToken": true,
            "output": output.iter().map(|u| serde_json::json!({"type": "Patient", "url": u})).collect::<Vec<_>>(),
            "error": [],
        });
        Manifest::parse(
            body.to_string().as_bytes(),
            &url::Url::parse("https://ehr.example.org/fhir/status/1").unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_fresh_link_is_found_by_its_url_else_by_its_place() {
        let fresh = manifest(&[
            "https://files.example.org/a.ndjson?sig=new",
            "https://files.example.org/data?part=1&sig=new",
            "https://files.example.org/data?part=2&sig=new",
        ]);
        let old_a = entry("https://files.example.org/a.ndjson?sig=old");
        assert_eq!(
            find_fresh_link(&fresh, &old_a, FileKind::Output, Some(2)).unwrap(),
            fresh.output[0].url,
            "a unique URL wins over the position"
        );
        let part_2 = entry("https://files.example.org/data?part=2&sig=old");
        assert_eq!(
            find_fresh_link(&fresh, &part_2, FileKind::Output, Some(2)).unwrap(),
            fresh.output[2].url,
            "links alike but for their query are told apart by position"
        );
        assert_eq!(
            find_fresh_link(&fresh, &part_2, FileKind::Output, Some(0)),
            None,
            "never a file of another URL"
        );
        let gone = entry("https://files.example.org/gone.ndjson");
        assert_eq!(
            find_fresh_link(&fresh, &gone, FileKind::Output, Some(9)),
            None
        );
    }

    #[test]
    fn a_download_is_too_slow_only_below_the_rate_over_a_full_window() {
        let min = Throughput {
            bytes_per_second: 1000,
            window: Duration::from_secs(2),
        };
        assert!(
            !min.too_slow(10, Duration::from_secs(1)),
            "not a full window yet"
        );
        assert!(min.too_slow(1999, Duration::from_secs(2)));
        assert!(!min.too_slow(2000, Duration::from_secs(2)));
        assert!(min.too_slow(2500, Duration::from_secs(3)));
    }
}
