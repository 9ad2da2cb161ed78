//! Streaming NDJSON loader: bytes → lines → light parse → COPY batches → set-based merge.
//!
//! Memory is bounded by one batch whatever the file size. Each batch commits its rows, its
//! rejected lines and the file's new line checkpoint in one transaction, so a crash resumes
//! after the last committed batch and loading a finished file again changes nothing. A bad line
//! is recorded (file, line number, reason) and never stops the rest of the file.

use serde::Deserialize;
use sqlx::PgPool;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::LoadError;
use crate::fhir;

/// What a file holds, which decides where its lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Resources of one type, merged into `fhir_sync.resource`.
    Output,
    /// OperationOutcomes from the manifest's `error` list, stored in `fhir_sync.export_error`.
    Error,
}

/// The file being loaded and where its rows belong.
#[derive(Debug, Clone)]
pub struct FileTarget {
    pub run_id: i64,
    pub file_id: i64,
    pub source: String,
    pub kind: FileKind,
    /// The `resourceType` every line must have.
    pub resource_type: String,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadLimits {
    /// Lines per batch (transaction and checkpoint).
    pub batch_lines: usize,
    /// Longest accepted line; longer lines are rejected.
    pub max_line_bytes: usize,
}

/// What one call of [`load_ndjson`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Lines already committed by an earlier attempt and skipped this time.
    pub resumed_after_line: u64,
    /// Lines read past the checkpoint (including blank and rejected ones).
    pub lines: u64,
    pub loaded: u64,
    pub rejected: u64,
}

/// Bytes of COPY data after which a batch is flushed even if it has fewer lines.
const BATCH_BYTES: usize = 16 * 1024 * 1024;
/// How much of a rejected line is kept for diagnosis.
const EXCERPT_CHARS: usize = 1000;

#[derive(Deserialize)]
struct Light<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    meta: Option<LightMeta<'a>>,
}

#[derive(Deserialize)]
struct LightMeta<'a> {
    #[serde(rename = "versionId", borrow)]
    version_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "lastUpdated", borrow)]
    last_updated: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Default)]
struct Batch {
    /// COPY data: CSV with \x02 as delimiter and \x01 as quote, characters that valid JSON
    /// text cannot contain raw, so the JSON needs no escaping at all.
    copy: Vec<u8>,
    rows: u64,
    reject_lines: Vec<i64>,
    reject_reasons: Vec<String>,
    reject_excerpts: Vec<String>,
}

impl Batch {
    fn len(&self) -> usize {
        self.rows as usize + self.reject_lines.len()
    }

    fn reject(&mut self, line_number: u64, reason: String, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let excerpt: String = text
            .chars()
            .take(EXCERPT_CHARS)
            .map(|c| if c == '\0' { '\u{fffd}' } else { c })
            .collect();
        self.reject_lines.push(line_number as i64);
        self.reject_reasons.push(reason);
        self.reject_excerpts.push(excerpt);
    }
}

/// Loads one NDJSON file from `reader`, resuming after the file's committed checkpoint.
pub async fn load_ndjson<R>(
    pool: &PgPool,
    target: &FileTarget,
    mut reader: R,
    limits: LoadLimits,
) -> Result<LoadStats, LoadError>
where
    R: AsyncBufRead + Unpin,
{
    let committed: i64 =
        sqlx::query_scalar("SELECT lines_committed FROM fhir_sync.run_file WHERE id = $1")
            .bind(target.file_id)
            .fetch_one(pool)
            .await?;
    let mut checkpoint = committed as u64;
    let mut stats = LoadStats {
        resumed_after_line: checkpoint,
        ..LoadStats::default()
    };
    let mut line_number = 0u64;
    let mut line = Vec::new();
    let mut batch = Batch::default();
    loop {
        let read = next_line(&mut reader, &mut line, limits.max_line_bytes)
            .await
            .map_err(LoadError::Read)?;
        let Some(read) = read else { break };
        line_number += 1;
        if line_number <= checkpoint {
            continue;
        }
        stats.lines += 1;
        match read {
            LineRead::TooLong { bytes } => {
                batch.reject(
                    line_number,
                    format!(
                        "line is {bytes} bytes, over the {} byte limit",
                        limits.max_line_bytes
                    ),
                    &line,
                );
            }
            LineRead::Complete => classify(target, line_number, trim_line_end(&line), &mut batch),
        }
        if batch.len() >= limits.batch_lines || batch.copy.len() >= BATCH_BYTES {
            flush(
                pool,
                target,
                &mut batch,
                &mut checkpoint,
                line_number,
                &mut stats,
            )
            .await?;
        }
    }
    // Always commit the final checkpoint, even for an empty batch: a file that ends in blank
    // lines must still be seen as complete.
    if line_number > checkpoint {
        flush(
            pool,
            target,
            &mut batch,
            &mut checkpoint,
            line_number,
            &mut stats,
        )
        .await?;
    }
    Ok(stats)
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Decides whether a line loads or is rejected, and stages it accordingly.
fn classify(target: &FileTarget, line_number: u64, line: &[u8], batch: &mut Batch) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return; // Blank lines (a trailing newline, say) carry nothing; they are not errors.
    }
    let parsed: Light<'_> = match serde_json::from_slice(line) {
        Ok(parsed) => parsed,
        Err(e) => return batch.reject(line_number, format!("not valid JSON: {e}"), line),
    };
    let resource_type = parsed.resource_type.as_deref().unwrap_or_default();
    if resource_type != target.resource_type {
        let reason = if resource_type.is_empty() {
            "no resourceType".to_string()
        } else {
            format!(
                "resourceType {resource_type:?} in a file of {:?}",
                target.resource_type
            )
        };
        return batch.reject(line_number, reason, line);
    }
    // PostgreSQL's jsonb cannot hold U+0000; such a line would fail the whole COPY batch.
    if memchr::memmem::find(line, b"\\u0000").is_some() {
        return batch.reject(
            line_number,
            "contains \\u0000, which PostgreSQL jsonb cannot store".into(),
            line,
        );
    }
    match target.kind {
        FileKind::Output => {
            let id = parsed.id.as_deref().unwrap_or_default();
            if !fhir::is_valid_id(id) {
                let reason = if id.is_empty() {
                    "no id".to_string()
                } else {
                    format!("id {id:?} is not a valid FHIR id")
                };
                return batch.reject(line_number, reason, line);
            }
            let meta = parsed.meta.as_ref();
            let version_id = meta.and_then(|m| m.version_id.as_deref());
            if let Some(version) = version_id
                && !fhir::is_valid_id(version)
            {
                return batch.reject(
                    line_number,
                    format!("meta.versionId {version:?} is not a valid id"),
                    line,
                );
            }
            let last_updated = meta.and_then(|m| m.last_updated.as_deref());
            if let Some(instant) = last_updated
                && fhir::parse_instant(instant).is_none()
            {
                return batch.reject(
                    line_number,
                    format!("meta.lastUpdated {instant:?} is not a FHIR instant"),
                    line,
                );
            }
            // Columns: line, id, version_id, last_updated, resource. Empty unquoted = NULL.
            let copy = &mut batch.copy;
            copy.extend_from_slice(line_number.to_string().as_bytes());
            copy.push(0x02);
            copy.extend_from_slice(id.as_bytes());
            copy.push(0x02);
            copy.extend_from_slice(version_id.unwrap_or_default().as_bytes());
            copy.push(0x02);
            copy.extend_from_slice(last_updated.unwrap_or_default().as_bytes());
            copy.extend_from_slice(b"\x02\x01");
            copy.extend_from_slice(line);
            copy.extend_from_slice(b"\x01\n");
        }
        FileKind::Error => {
            let copy = &mut batch.copy;
            copy.extend_from_slice(line_number.to_string().as_bytes());
            copy.extend_from_slice(b"\x02\x02\x02\x02\x01");
            copy.extend_from_slice(line);
            copy.extend_from_slice(b"\x01\n");
        }
    }
    batch.rows += 1;
}

const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS fhir_sync_staging (
    line bigint NOT NULL, id text, version_id text, last_updated timestamptz, resource jsonb NOT NULL
) ON COMMIT DELETE ROWS";

const COPY_STAGING: &str = "COPY fhir_sync_staging (line, id, version_id, last_updated, resource)
    FROM STDIN WITH (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')";

/// Newer wins: a row is replaced only by a version whose lastUpdated is not older, so
/// overlapping or out-of-order files never regress it. Within a batch the newest (then the
/// last) line for an id is the one merged.
const MERGE_RESOURCES: &str = "INSERT INTO fhir_sync.resource AS r
        (source, resource_type, id, version_id, last_updated, resource, first_run_id, last_run_id)
    SELECT DISTINCT ON (id) $1, $2, id, version_id, last_updated, resource, $3, $3
    FROM fhir_sync_staging
    ORDER BY id, last_updated DESC NULLS LAST, line DESC
    ON CONFLICT (source, resource_type, id) DO UPDATE SET
        version_id = EXCLUDED.version_id,
        last_updated = EXCLUDED.last_updated,
        resource = EXCLUDED.resource,
        last_run_id = EXCLUDED.last_run_id
    WHERE r.last_updated IS NULL OR EXCLUDED.last_updated IS NULL OR EXCLUDED.last_updated >= r.last_updated";

const STORE_OUTCOMES: &str =
    "INSERT INTO fhir_sync.export_error (file_id, line_number, run_id, outcome)
    SELECT $1, line, $2, resource FROM fhir_sync_staging
    ON CONFLICT (file_id, line_number) DO NOTHING";

async fn flush(
    pool: &PgPool,
    target: &FileTarget,
    batch: &mut Batch,
    checkpoint: &mut u64,
    through_line: u64,
    stats: &mut LoadStats,
) -> Result<(), LoadError> {
    let mut tx = pool.begin().await?;
    if batch.rows > 0 {
        sqlx::query(CREATE_STAGING).execute(&mut *tx).await?;
        let mut copy = tx.copy_in_raw(COPY_STAGING).await?;
        copy.send(batch.copy.as_slice()).await?;
        copy.finish().await?;
        match target.kind {
            FileKind::Output => {
                sqlx::query(MERGE_RESOURCES)
                    .bind(&target.source)
                    .bind(&target.resource_type)
                    .bind(target.run_id)
                    .execute(&mut *tx)
                    .await?;
            }
            FileKind::Error => {
                sqlx::query(STORE_OUTCOMES)
                    .bind(target.file_id)
                    .bind(target.run_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    if !batch.reject_lines.is_empty() {
        sqlx::query(
            "INSERT INTO fhir_sync.rejected_line (file_id, line_number, run_id, reason, raw_excerpt)
             SELECT $1, line, $2, reason, excerpt FROM UNNEST($3::bigint[], $4::text[], $5::text[]) AS r(line, reason, excerpt)
             ON CONFLICT (file_id, line_number) DO NOTHING",
        )
        .bind(target.file_id)
        .bind(target.run_id)
        .bind(&batch.reject_lines)
        .bind(&batch.reject_reasons)
        .bind(&batch.reject_excerpts)
        .execute(&mut *tx)
        .await?;
    }
    let rejected = batch.reject_lines.len() as i64;
    // The checkpoint only moves forward from where this loader found it: if another process
    // moved it meanwhile, nothing of this batch is committed.
    let updated = sqlx::query(
        "UPDATE fhir_sync.run_file SET lines_committed = $3, resources_loaded = resources_loaded + $4,
             lines_rejected = lines_rejected + $5
         WHERE id = $1 AND lines_committed = $2",
    )
    .bind(target.file_id)
    .bind(*checkpoint as i64)
    .bind(through_line as i64)
    .bind(batch.rows as i64)
    .bind(rejected)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() != 1 {
        tx.rollback().await?;
        return Err(LoadError::Database(sqlx::Error::Protocol(format!(
            "file {} checkpoint moved while loading it; another loader is working on it",
            target.file_id
        ))));
    }
    tx.commit().await?;
    stats.loaded += batch.rows;
    stats.rejected += rejected as u64;
    *checkpoint = through_line;
    *batch = Batch::default();
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// The line is in the buffer, without its `\n`.
    Complete,
    /// The line exceeded the limit; the buffer holds its first bytes only.
    TooLong { bytes: usize },
}

/// Reads the next line into `buf` without ever holding more than `max` bytes of it.
/// Returns `None` at the end of input. A last line without `\n` still counts.
async fn next_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<LineRead>> {
    buf.clear();
    let mut total = 0usize;
    let mut saw_bytes = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(saw_bytes.then(|| finish_line(buf, total, max)));
        }
        saw_bytes = true;
        let newline = memchr::memchr(b'\n', available);
        let chunk = &available[..newline.unwrap_or(available.len())];
        total += chunk.len();
        if buf.len() + chunk.len() <= max {
            buf.extend_from_slice(chunk);
        } else if buf.len() < EXCERPT_CHARS {
            // Keep just enough of an over-long line to show in the rejection record.
            let room = EXCERPT_CHARS - buf.len();
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        let consumed = newline.map_or(available.len(), |i| i + 1);
        reader.consume(consumed);
        if newline.is_some() {
            return Ok(Some(finish_line(buf, total, max)));
        }
    }
}

fn finish_line(buf: &mut Vec<u8>, total: usize, max: usize) -> LineRead {
    if total > max {
        buf.truncate(EXCERPT_CHARS);
        LineRead::TooLong { bytes: total }
    } else {
        LineRead::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<(Vec<u8>, LineRead)> {
        // A tiny buffer forces lines to span many fill_buf calls.
        let mut reader = tokio::io::BufReader::with_capacity(3, input);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(read) = next_line(&mut reader, &mut buf, max).await.unwrap() {
            out.push((buf.clone(), read));
        }
        out
    }

    #[tokio::test]
    async fn splits_lines_across_buffer_boundaries() {
        let got = lines(b"{\"a\":1}\n\n{\"b\":22}", 100).await;
        assert_eq!(
            got,
            vec![
                (b"{\"a\":1}".to_vec(), LineRead::Complete),
                (Vec::new(), LineRead::Complete),
                (b"{\"b\":22}".to_vec(), LineRead::Complete),
            ]
        );
        assert!(lines(b"", 100).await.is_empty());
    }

    #[tokio::test]
    async fn over_long_lines_are_flagged_and_the_next_line_survives() {
        let long = "x".repeat(50);
        let input = format!("{long}\nok\n");
        let got = lines(input.as_bytes(), 10).await;
        assert_eq!(got[0].1, LineRead::TooLong { bytes: 50 });
        assert_eq!(got[1], (b"ok".to_vec(), LineRead::Complete));
    }

    fn target() -> FileTarget {
        FileTarget {
            run_id: 1,
            file_id: 1,
            source: "s".into(),
            kind: FileKind::Output,
            resource_type: "Patient".into(),
        }
    }

    #[test]
    fn classification() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"2","lastUpdated":"2024-01-01T00:00:00Z"}}"#,
                None,
            ),
            (r#"{"resourceType":"Patient","id":"p1"}"#, None),
            ("   ", None),
            ("{not json", Some("not valid JSON")),
            (r#"{"resourceType":"Patient"}"#, Some("no id")),
            (
                r#"{"resourceType":"Patient","id":"a b"}"#,
                Some("is not a valid FHIR id"),
            ),
            (
                r#"{"resourceType":"Observation","id":"o1"}"#,
                Some("in a file of \"Patient\""),
            ),
            (r#"{"id":"o1"}"#, Some("no resourceType")),
            (
                r#"{"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"yesterday"}}"#,
                Some("not a FHIR instant"),
            ),
            (
                r#"{"resourceType":"Patient","id":"p1","name":"a\u0000b"}"#,
                Some("\\u0000"),
            ),
            (
                r#"{"resourceType":"Patient","id":"p1"} trailing"#,
                Some("not valid JSON"),
            ),
        ];
        for (line, expected) in cases {
            let mut batch = Batch::default();
            classify(&target(), 7, line.as_bytes(), &mut batch);
            match expected {
                None => assert!(
                    batch.reject_reasons.is_empty(),
                    "{line}: {:?}",
                    batch.reject_reasons
                ),
                Some(reason) => {
                    assert_eq!(batch.rows, 0, "{line}");
                    assert_eq!(batch.reject_lines, [7], "{line}");
                    assert!(
                        batch.reject_reasons[0].contains(reason),
                        "{line}: {}",
                        batch.reject_reasons[0]
                    );
                }
            }
        }
    }
}
