//! Streaming NDJSON loader: bytes → lines → light parse → COPY batches → set-based merge.
//!
//! Memory is bounded by two batches whatever the file size (the next batch is read and parsed
//! while the previous one is staged or commits). Each batch commits its rows, its
//! rejected lines and the file's new line checkpoint in one transaction, so a crash resumes
//! after the last committed batch and loading a finished file again changes nothing. A bad line
//! is recorded (file, line number, reason) and never stops the rest of the file.
//!
//! Resources take one of two paths per batch. When the type's partition holds nothing of this
//! source yet (a first load), the batch is COPYed straight into the partition inside a
//! savepoint: with no stored row and no duplicate id in the batch, that is exactly what the merge
//! would have produced, at a fraction of the cost. The first unique violation proves otherwise;
//! the savepoint is rolled back and this and every later batch of the file goes through a
//! staging table and the newer-wins merge. Staged batches are pipelined over two connections:
//! batch n+1 is COPYed into the staging table of its own open transaction while batch n merges
//! and commits, and merges only after batch n has committed, so batches still commit in file
//! order. The loader never issues row-by-row statements.
//! Partitions are created with fillfactor 80 (migration `partition_fillfactor`): the merge's
//! updates then mostly find room on their own page and are HOT, which keeps an incremental load
//! from writing a key entry and a fresh page for every changed resource.
//!
//! Memory per file being loaded: two batches of COPY data (each flushed at `batch_lines` lines
//! or `BATCH_BYTES`, whichever comes first, so at most `BATCH_BYTES` plus one line), the line
//! being read (at most `max_line_bytes`), and the reader's buffer. A process loads at most
//! `queue.concurrency` files at once, and at most `sync.max_parallel_downloads` of one source
//! across every process.

use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};

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
    /// Bundles of DELETE entries from the manifest's `deleted` list, which mark rows deleted.
    Deleted,
}

impl FileKind {
    /// The `resourceType` every line of such a file has, when it does not depend on the file.
    pub fn line_type(self) -> Option<&'static str> {
        match self {
            FileKind::Output => None,
            FileKind::Error => Some("OperationOutcome"),
            FileKind::Deleted => Some("Bundle"),
        }
    }

    /// The `run_file.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Output => "output",
            FileKind::Error => "error",
            FileKind::Deleted => "deleted",
        }
    }
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Lines already committed by an earlier attempt and skipped this time.
    pub resumed_after_line: u64,
    /// Lines read past the checkpoint (including blank and rejected ones).
    pub lines: u64,
    /// Lines loaded by this call: resources, OperationOutcomes or deletion Bundles.
    pub loaded: u64,
    pub rejected: u64,
    /// Deletions applied by this call (entries of deletion Bundles).
    pub deletions: u64,
    /// Set when the manifest's `count` for the file differs from the lines loaded plus rejected
    /// over all attempts; also stored in `run_file.count_mismatch`.
    pub count_mismatch: Option<String>,
}

/// Bytes of COPY data after which a batch is flushed even if it has fewer lines. Two batches per
/// file can be in memory (one read while the other commits).
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// How much of a rejected line is kept for diagnosis.
const EXCERPT_CHARS: usize = 1000;

#[derive(Deserialize)]
struct Light<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    meta: Option<LightMeta<'a>>,
    #[serde(borrow)]
    subject: Option<LightReference<'a>>,
    #[serde(borrow)]
    patient: Option<LightReference<'a>>,
}

#[derive(Deserialize)]
struct LightMeta<'a> {
    #[serde(rename = "versionId", borrow)]
    version_id: Option<Cow<'a, str>>,
    #[serde(rename = "lastUpdated", borrow)]
    last_updated: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct LightReference<'a> {
    #[serde(borrow)]
    reference: Option<Cow<'a, str>>,
}

/// One line of a `deleted` file: a Bundle whose entries each delete one resource.
#[derive(Deserialize)]
struct DeletionBundle<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    entry: Vec<DeletionEntry<'a>>,
}

#[derive(Deserialize)]
struct DeletionEntry<'a> {
    #[serde(borrow)]
    request: Option<DeletionRequest<'a>>,
    #[serde(borrow)]
    response: Option<DeletionResponse<'a>>,
}

#[derive(Deserialize)]
struct DeletionRequest<'a> {
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    url: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DeletionResponse<'a> {
    #[serde(rename = "lastModified", borrow)]
    last_modified: Option<Cow<'a, str>>,
}

/// The id of the Patient a reference points to (`Patient/123`, an absolute URL ending in
/// `Patient/123`, optionally with `/_history/2`), or `None` for any other reference.
fn patient_id_of(reference: &str) -> Option<&str> {
    let reference = match reference.find("/_history/") {
        Some(at) => &reference[..at],
        None => reference,
    };
    let (rest, id) = reference.rsplit_once('/')?;
    let is_patient = rest == "Patient" || rest.ends_with("/Patient");
    (is_patient && fhir::is_valid_id(id)).then_some(id)
}

/// `Type/id` (or an absolute URL ending in it) of a DELETE entry.
fn deleted_type_and_id(url: &str) -> Option<(&str, &str)> {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    let (rest, id) = url.trim_end_matches('/').rsplit_once('/')?;
    let resource_type = rest.rsplit('/').next().unwrap_or(rest);
    (fhir::is_resource_type(resource_type) && fhir::is_valid_id(id)).then_some((resource_type, id))
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
    /// Deletions of a `deleted` file: type, id, and the entry's lastModified if it had one.
    delete_types: Vec<String>,
    delete_ids: Vec<String>,
    delete_times: Vec<Option<String>>,
    /// Hashes of the ids staged so far, to tell whether an id occurs twice in the batch.
    id_hashes: HashSet<u64>,
    /// Whether some id (or a hash collision, which only costs the slower merge) occurs twice.
    duplicate_ids: bool,
    hasher: RandomState,
}

impl Batch {
    /// The merge of the staged rows into the warehouse. Without a repeated id it needs no
    /// DISTINCT ON, whose sort of whole rows would spill to disk for a batch larger than
    /// work_mem.
    fn merge_statement(&self) -> &'static str {
        if self.duplicate_ids {
            MERGE_RESOURCES
        } else {
            MERGE_UNIQUE_RESOURCES
        }
    }

    fn len(&self) -> usize {
        self.rows as usize + self.reject_lines.len() + self.delete_ids.len()
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

/// The constant columns of every COPY row of a file, rendered once: the leading
/// `source, resource_type` and the trailing `first_run_id, last_run_id`.
struct RowFrame {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl RowFrame {
    fn new(target: &FileTarget) -> Result<RowFrame, LoadError> {
        // The source is a job name and the type a checked type name; neither may break the
        // COPY framing, which a quote or delimiter character would.
        if target
            .source
            .bytes()
            .any(|b| b == 0x01 || b == 0x02 || b == b'\n' || b == b'\r' || b == 0)
        {
            return Err(LoadError::Invalid(format!(
                "source name {:?} contains control characters",
                target.source
            )));
        }
        let mut head = vec![0x01];
        head.extend_from_slice(target.source.as_bytes());
        head.extend_from_slice(b"\x01\x02");
        head.extend_from_slice(target.resource_type.as_bytes());
        head.push(0x02);
        let tail = format!("{}\x02{}\x02", target.run_id, target.run_id).into_bytes();
        Ok(RowFrame { head, tail })
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
    let expected_type = target
        .kind
        .line_type()
        .unwrap_or(target.resource_type.as_str());
    if expected_type != target.resource_type {
        return Err(LoadError::Invalid(format!(
            "a {} file must hold {expected_type}, not {}",
            target.kind.as_str(),
            target.resource_type
        )));
    }
    let frame = RowFrame::new(target)?;
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
    let mut path = MergePath::Staged;
    if target.kind == FileKind::Output {
        if !fhir::is_resource_type(&target.resource_type) {
            return Err(LoadError::Invalid(format!(
                "{:?} is not a FHIR resource type",
                target.resource_type
            )));
        }
        ensure_resource_type(pool, &target.resource_type).await?;
        let empty: bool = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM fhir_sync.resource WHERE source = $1 AND resource_type = $2)",
        )
        .bind(&target.source)
        .bind(&target.resource_type)
        .fetch_one(pool)
        .await?;
        if empty {
            path = MergePath::Direct;
        }
    }
    let resume_after = checkpoint;
    let mut reading = Reading {
        reader: &mut reader,
        line: Vec::new(),
        line_number: 0,
        lines: 0,
    };
    let mut flusher = Flusher {
        pool,
        target,
        path,
        checkpoint: &mut checkpoint,
        stats: &mut stats,
    };
    // The next batch is read and parsed while the previous one is committed, so the download,
    // the light parse and PostgreSQL's work overlap. Once a file merges through the staging
    // table, a third stage joins: batch n+1 is COPYed into the staging table of its own
    // transaction (on a second connection) while batch n merges and commits, so PostgreSQL
    // parses one batch's JSON while it merges the other's. Batches still merge and commit one
    // after the other, each with its checkpoint, and a staged batch touches nothing but its own
    // temporary table until its turn. The two COPY buffers take turns for the whole file rather
    // than being allocated per batch (a staged batch hands its buffer back once its COPY is
    // sent): a fresh multi-megabyte buffer per batch costs page faults, and the allocator may
    // keep freed ones resident.
    let mut pending: Option<(Batch, u64)> = None;
    let mut staged: Option<Staged> = None;
    let mut spare = Vec::new();
    let mut submitted_through = resume_after;
    let mut end_of_file = false;
    loop {
        let pipelined = flusher.pipelines();
        let to_stage = if pipelined { pending.take() } else { None };
        let to_commit = if pipelined { None } else { pending.take() };
        let to_finish = staged.take();
        let buffer = std::mem::take(&mut spare);
        // Tells the stage that the batch before it has finished (or that there is none).
        let (finished, turn) = tokio::sync::oneshot::channel::<()>();
        let (filled, staged_now, committed) = tokio::join!(
            async {
                if end_of_file {
                    return Ok(None);
                }
                reading
                    .fill(target, &frame, limits, resume_after, buffer)
                    .await
                    .map(Some)
            },
            async {
                match to_stage {
                    Some((batch, through_line)) => {
                        stage(pool, batch, through_line, turn).await.map(Some)
                    }
                    None => Ok(None),
                }
            },
            async {
                // At most one of the two is set: a staged batch only exists once pipelined.
                if let Some(batch) = to_finish {
                    let result = flusher.finish_staged(batch).await;
                    drop(finished);
                    result?;
                }
                commit(&mut flusher, to_commit).await
            },
        );
        if let Some(buffer) = committed? {
            spare = buffer;
        }
        if let Some((batch, buffer)) = staged_now? {
            staged = Some(batch);
            spare = buffer;
        }
        if let Some((batch, at_end)) = filled? {
            end_of_file = at_end;
            // At the end of the file the last batch is committed even when it is empty: a file
            // that ends in blank lines must still be seen as complete.
            if reading.line_number > submitted_through {
                submitted_through = reading.line_number;
                pending = Some((batch, submitted_through));
            }
        }
        if end_of_file && pending.is_none() && staged.is_none() {
            break;
        }
    }
    stats.lines = reading.lines;
    stats.count_mismatch = check_count(pool, target.file_id).await?;
    Ok(stats)
}

/// Reads lines into batches.
struct Reading<'r, R> {
    reader: &'r mut R,
    line: Vec<u8>,
    /// Lines read so far, including those skipped below the checkpoint.
    line_number: u64,
    /// Lines read past the checkpoint.
    lines: u64,
}

impl<R: AsyncBufRead + Unpin> Reading<'_, R> {
    /// Reads until a batch is full (`false`) or the input ends (`true`).
    async fn fill(
        &mut self,
        target: &FileTarget,
        frame: &RowFrame,
        limits: LoadLimits,
        resume_after: u64,
        mut copy: Vec<u8>,
    ) -> Result<(Batch, bool), LoadError> {
        copy.clear();
        // Reserved up front so that the buffer never reallocates (briefly holding two copies)
        // on its way to BATCH_BYTES; pages count towards RSS only once written. A recycled
        // buffer has the capacity already.
        copy.reserve(BATCH_BYTES + 64 * 1024);
        let mut batch = Batch {
            copy,
            ..Batch::default()
        };
        loop {
            let read = next_line(self.reader, &mut self.line, limits.max_line_bytes)
                .await
                .map_err(LoadError::Read)?;
            let Some(read) = read else {
                return Ok((batch, true));
            };
            self.line_number += 1;
            if self.line_number <= resume_after {
                continue;
            }
            self.lines += 1;
            match read {
                LineRead::TooLong { bytes } => {
                    batch.reject(
                        self.line_number,
                        format!(
                            "line is {bytes} bytes, over the {} byte limit",
                            limits.max_line_bytes
                        ),
                        &self.line,
                    );
                }
                LineRead::Complete => classify(
                    target,
                    frame,
                    self.line_number,
                    trim_line_end(&self.line),
                    &mut batch,
                ),
            }
            if batch.len() >= limits.batch_lines || batch.copy.len() >= BATCH_BYTES {
                return Ok((batch, false));
            }
        }
    }
}

/// Commits the pending batch, if any, and hands back its COPY buffer for the next one.
async fn commit(
    flusher: &mut Flusher<'_>,
    pending: Option<(Batch, u64)>,
) -> Result<Option<Vec<u8>>, LoadError> {
    match pending {
        Some((batch, through_line)) => {
            flusher.flush(&batch, through_line).await?;
            Ok(Some(batch.copy))
        }
        None => Ok(None),
    }
}

/// Compares the manifest's count with what the file's attempts loaded and rejected in total,
/// and records the verdict on the file.
async fn check_count(pool: &PgPool, file_id: i64) -> Result<Option<String>, LoadError> {
    let mismatch: Option<String> = sqlx::query_scalar(
        "UPDATE fhir_sync.run_file SET count_mismatch =
             CASE WHEN manifest_count IS NOT NULL AND manifest_count <> resources_loaded + lines_rejected
                  THEN format('the manifest counts %s lines, but %s loaded and %s were rejected',
                              manifest_count, resources_loaded, lines_rejected)
             END
         WHERE id = $1 RETURNING count_mismatch",
    )
    .bind(file_id)
    .fetch_one(pool)
    .await?;
    Ok(mismatch)
}

/// Creates the type's partition and `fhir` view on first sight, in its own transaction so that
/// the DDL lock is not held across a load.
async fn ensure_resource_type(pool: &PgPool, resource_type: &str) -> Result<(), LoadError> {
    sqlx::query("SELECT fhir_sync.ensure_resource_type($1)")
        .bind(resource_type)
        .execute(pool)
        .await?;
    Ok(())
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Decides whether a line loads or is rejected, and stages it accordingly.
fn classify(
    target: &FileTarget,
    frame: &RowFrame,
    line_number: u64,
    line: &[u8],
    batch: &mut Batch,
) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return; // Blank lines (a trailing newline, say) carry nothing; they are not errors.
    }
    if target.kind == FileKind::Deleted {
        return classify_deletion(line_number, line, batch);
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
            let patient_id = if resource_type == "Patient" {
                Some(id)
            } else {
                [&parsed.subject, &parsed.patient]
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.reference.as_deref())
                    .find_map(patient_id_of)
            };
            let hash = batch.hasher.hash_one(id);
            if !batch.id_hashes.insert(hash) {
                batch.duplicate_ids = true;
            }
            // Columns as in COPY_COLUMNS. Empty unquoted = NULL. Every value written unquoted
            // has been checked to hold no delimiter, quote or newline.
            let copy = &mut batch.copy;
            copy.extend_from_slice(&frame.head);
            copy.extend_from_slice(id.as_bytes());
            copy.push(0x02);
            copy.extend_from_slice(version_id.unwrap_or_default().as_bytes());
            copy.push(0x02);
            copy.extend_from_slice(last_updated.unwrap_or_default().as_bytes());
            copy.push(0x02);
            copy.extend_from_slice(patient_id.unwrap_or_default().as_bytes());
            copy.push(0x02);
            copy.extend_from_slice(&frame.tail);
            copy.push(0x01);
            copy.extend_from_slice(line);
            copy.extend_from_slice(b"\x01\n");
        }
        FileKind::Error => {
            let copy = &mut batch.copy;
            copy.extend_from_slice(line_number.to_string().as_bytes());
            copy.extend_from_slice(b"\x02\x01");
            copy.extend_from_slice(line);
            copy.extend_from_slice(b"\x01\n");
        }
        FileKind::Deleted => unreachable!("deletion files are classified above"),
    }
    batch.rows += 1;
}

/// A line of a `deleted` file: every entry must be a DELETE of `Type/id`, else the whole line
/// is rejected and none of its entries applied (a half-applied Bundle would be hard to explain).
fn classify_deletion(line_number: u64, line: &[u8], batch: &mut Batch) {
    let parsed: DeletionBundle<'_> = match serde_json::from_slice(line) {
        Ok(parsed) => parsed,
        Err(e) => return batch.reject(line_number, format!("not valid JSON: {e}"), line),
    };
    match parsed.resource_type.as_deref() {
        Some("Bundle") => {}
        Some(other) => {
            return batch.reject(
                line_number,
                format!("resourceType {other:?} in a file of \"Bundle\""),
                line,
            );
        }
        None => return batch.reject(line_number, "no resourceType".into(), line),
    }
    let mut deletions = Vec::with_capacity(parsed.entry.len());
    for (n, entry) in parsed.entry.iter().enumerate() {
        let request = entry.request.as_ref();
        let method = request.and_then(|r| r.method.as_deref());
        if method != Some("DELETE") {
            return batch.reject(
                line_number,
                format!("entry {n}: request.method is {method:?}, not \"DELETE\""),
                line,
            );
        }
        let url = request.and_then(|r| r.url.as_deref()).unwrap_or_default();
        let Some((resource_type, id)) = deleted_type_and_id(url) else {
            return batch.reject(
                line_number,
                format!("entry {n}: request.url {url:?} is not Type/id"),
                line,
            );
        };
        let at = entry
            .response
            .as_ref()
            .and_then(|r| r.last_modified.as_deref());
        if let Some(at) = at
            && fhir::parse_instant(at).is_none()
        {
            return batch.reject(
                line_number,
                format!("entry {n}: response.lastModified {at:?} is not a FHIR instant"),
                line,
            );
        }
        deletions.push((resource_type, id, at));
    }
    for (resource_type, id, at) in deletions {
        batch.delete_types.push(resource_type.to_string());
        batch.delete_ids.push(id.to_string());
        batch.delete_times.push(at.map(str::to_string));
    }
    batch.rows += 1;
}

/// How resource batches reach the target (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MergePath {
    /// COPY straight into the partition, falling back to `Staged` on the first conflict.
    Direct,
    /// COPY into the staging table, then the newer-wins merge.
    Staged,
}

const COPY_COLUMNS: &str = "(source, resource_type, id, version_id, last_updated, patient_id, first_run_id, last_run_id, resource)";

const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS fhir_sync_staging (
    source text, resource_type text, id text, version_id text, last_updated timestamptz,
    patient_id text, first_run_id bigint, last_run_id bigint, resource jsonb NOT NULL
) ON COMMIT DELETE ROWS";

const CSV: &str = "WITH (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')";

/// The conflict rule both merges share: newer wins, and a version newer than a row's deletion
/// revives it.
macro_rules! merge_on_conflict {
    () => {
        "    ON CONFLICT (source, resource_type, id) DO UPDATE SET
        version_id = EXCLUDED.version_id,
        last_updated = EXCLUDED.last_updated,
        patient_id = EXCLUDED.patient_id,
        resource = EXCLUDED.resource,
        last_run_id = EXCLUDED.last_run_id,
        deleted_at = NULL,
        deleted_by_run_id = NULL
    WHERE CASE WHEN r.deleted_at IS NOT NULL THEN EXCLUDED.last_updated > r.deleted_at
               ELSE fhir_sync.version_not_older(EXCLUDED.last_updated, EXCLUDED.version_id,
                                                r.last_updated, r.version_id) END"
    };
}

/// Newer wins: a row is replaced only by a version that is not older (lastUpdated, then
/// versionId). A deleted row is revived only by a version updated after the deletion; a version
/// without lastUpdated cannot show that and leaves the tombstone alone. Within a batch the newest
/// (then the last) line for an id is the one merged: the staging table is emptied at every
/// commit and filled by one COPY, so its physical order (ctid) is the file's line order.
const MERGE_RESOURCES: &str = concat!(
    "INSERT INTO fhir_sync.resource AS r
        (source, resource_type, id, version_id, last_updated, patient_id, resource, first_run_id, last_run_id)
    SELECT DISTINCT ON (id) source, resource_type, id, version_id, last_updated, patient_id, resource,
        first_run_id, last_run_id
    FROM fhir_sync_staging
    ORDER BY id, last_updated DESC NULLS LAST,
        CASE WHEN version_id ~ '^[0-9]{1,18}$' THEN version_id::bigint END DESC NULLS LAST,
        version_id COLLATE \"C\" DESC NULLS LAST, ctid DESC
",
    merge_on_conflict!()
);

/// [`MERGE_RESOURCES`] for a batch in which every id occurs once.
const MERGE_UNIQUE_RESOURCES: &str = concat!(
    "INSERT INTO fhir_sync.resource AS r
        (source, resource_type, id, version_id, last_updated, patient_id, resource, first_run_id, last_run_id)
    SELECT source, resource_type, id, version_id, last_updated, patient_id, resource,
        first_run_id, last_run_id
    FROM fhir_sync_staging
",
    merge_on_conflict!()
);

const CREATE_OUTCOME_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS fhir_sync_outcome_staging (
    line bigint NOT NULL, outcome jsonb NOT NULL
) ON COMMIT DELETE ROWS";

const STORE_OUTCOMES: &str =
    "INSERT INTO fhir_sync.export_error (file_id, line_number, run_id, outcome)
    SELECT $1, line, $2, outcome FROM fhir_sync_outcome_staging
    ON CONFLICT (file_id, line_number) DO NOTHING";

/// Deletions: the row is marked deleted (its last version kept) unless the stored version is
/// newer than the deletion, or was loaded by this very run's output files. An export lists in
/// `output` what exists at its transactionTime, so a resource that is in both lists was
/// recreated after its deletion, and the deletion (dated by the transactionTime when the entry
/// has no lastModified) must not hide it. An id never seen gets a tombstone row without a
/// resource, so that an older version arriving later cannot resurrect it.
const APPLY_DELETIONS: &str = "INSERT INTO fhir_sync.resource AS r
        (source, resource_type, id, resource, first_run_id, last_run_id, deleted_at, deleted_by_run_id)
    SELECT DISTINCT ON (d.resource_type, d.id) $1, d.resource_type, d.id, NULL, $2, $2,
        coalesce(d.at::timestamptz, run.transaction_time::timestamptz, now()), $2
    FROM UNNEST($3::text[], $4::text[], $5::text[]) AS d(resource_type, id, at)
    CROSS JOIN (SELECT transaction_time FROM fhir_sync.run WHERE id = $2) run
    ORDER BY d.resource_type, d.id, d.at::timestamptz DESC NULLS FIRST
    ON CONFLICT (source, resource_type, id) DO UPDATE SET
        deleted_at = EXCLUDED.deleted_at,
        deleted_by_run_id = EXCLUDED.deleted_by_run_id
    WHERE (r.last_updated IS NULL OR r.last_updated <= EXCLUDED.deleted_at)
      AND (r.deleted_at IS NULL OR r.deleted_at < EXCLUDED.deleted_at)
      AND (r.last_run_id <> EXCLUDED.deleted_by_run_id OR r.deleted_at IS NOT NULL)";

/// A pooled connection that goes back to the pool only when released. A flush dropped half-way
/// (its task aborted, say) can leave the connection inside a COPY, where the next user would
/// fail; such a connection is closed instead, which also rolls its transaction back.
struct ConnectionGuard(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>);

impl ConnectionGuard {
    fn get(&mut self) -> &mut sqlx::PgConnection {
        // Present from construction until `release` consumes the guard.
        self.0
            .as_mut()
            .expect("the connection is held until released")
    }

    fn release(mut self) {
        self.0.take();
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(connection) = self.0.as_mut() {
            connection.close_on_drop();
        }
    }
}

/// Commits batches and advances the checkpoint.
struct Flusher<'a> {
    pool: &'a PgPool,
    target: &'a FileTarget,
    path: MergePath,
    checkpoint: &'a mut u64,
    stats: &'a mut LoadStats,
}

impl Flusher<'_> {
    /// Whether batches go through [`stage`] and [`Flusher::finish_staged`]: resources merged
    /// through the staging table. First loads (`Direct`), error and deletion files commit each
    /// batch in one go.
    fn pipelines(&self) -> bool {
        self.target.kind == FileKind::Output && self.path == MergePath::Staged
    }

    /// Merges a staged batch, records its rejects and checkpoint, and commits.
    async fn finish_staged(&mut self, mut staged: Staged) -> Result<(), LoadError> {
        let batch = &staged.batch;
        let conn = staged.connection.get();
        if batch.rows > 0 {
            sqlx::query(batch.merge_statement())
                .execute(&mut *conn)
                .await?;
        }
        self.record(&mut *conn, batch, staged.through_line).await?;
        sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
        staged.connection.release();
        self.committed(batch, staged.through_line);
        Ok(())
    }

    /// Records a batch's rejected lines and moves the file's checkpoint, inside the batch's
    /// transaction. The checkpoint only moves forward from where this loader found it: if
    /// another process moved it meanwhile, an error, and nothing of the batch is committed.
    async fn record(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &Batch,
        through_line: u64,
    ) -> Result<(), LoadError> {
        let target = self.target;
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
            .execute(&mut *conn)
            .await?;
        }
        let updated = sqlx::query(
            "UPDATE fhir_sync.run_file SET lines_committed = $3, resources_loaded = resources_loaded + $4,
                 lines_rejected = lines_rejected + $5
             WHERE id = $1 AND lines_committed = $2",
        )
        .bind(target.file_id)
        .bind(*self.checkpoint as i64)
        .bind(through_line as i64)
        .bind(batch.rows as i64)
        .bind(batch.reject_lines.len() as i64)
        .execute(&mut *conn)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(LoadError::Superseded {
                file_id: target.file_id,
            });
        }
        Ok(())
    }

    /// Counts a committed batch and moves the in-memory checkpoint.
    fn committed(&mut self, batch: &Batch, through_line: u64) {
        let target = self.target;
        let rejected = batch.reject_lines.len() as u64;
        crate::metrics::batch_committed(
            &target.source,
            target.kind.batch_rows(),
            &target.resource_type,
            batch.rows,
            rejected,
            &batch.delete_types,
        );
        self.stats.loaded += batch.rows;
        self.stats.rejected += rejected;
        self.stats.deletions += batch.delete_ids.len() as u64;
        *self.checkpoint = through_line;
    }

    async fn flush(&mut self, batch: &Batch, through_line: u64) -> Result<(), LoadError> {
        let target = self.target;
        if !batch.delete_types.is_empty() {
            let mut types: Vec<&str> = batch.delete_types.iter().map(String::as_str).collect();
            types.sort_unstable();
            types.dedup();
            for resource_type in types {
                ensure_resource_type(self.pool, resource_type).await?;
            }
        }
        let mut connection = ConnectionGuard(Some(self.pool.acquire().await?));
        let mut tx = sqlx::Acquire::begin(connection.get()).await?;
        // The commit need not wait for its WAL to reach the disk: a batch lost to a database
        // crash is lost whole, rows and checkpoint together, and is loaded again on resume. The
        // statement that marks the file loaded commits synchronously, which flushes every batch
        // before it, so nothing built on a loaded file can outlive a lost batch.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        if batch.rows > 0 {
            match target.kind {
                FileKind::Output => {
                    let mut direct_done = false;
                    if self.path == MergePath::Direct {
                        let mut savepoint = sqlx::Acquire::begin(&mut *tx).await?;
                        match copy_in(
                            &mut savepoint,
                            &format!("COPY fhir_sync.resource {COPY_COLUMNS} FROM STDIN {CSV}"),
                            &batch.copy,
                        )
                        .await
                        {
                            Ok(()) => {
                                savepoint.commit().await?;
                                direct_done = true;
                            }
                            Err(e) if is_unique_violation(&e) => {
                                savepoint.rollback().await?;
                                tracing::debug!(
                                    "a batch conflicts with stored rows; merging from now on"
                                );
                                self.path = MergePath::Staged;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    if !direct_done {
                        sqlx::query(CREATE_STAGING).execute(&mut *tx).await?;
                        copy_in(
                            &mut tx,
                            &format!("COPY fhir_sync_staging {COPY_COLUMNS} FROM STDIN {CSV}"),
                            &batch.copy,
                        )
                        .await?;
                        sqlx::query(batch.merge_statement())
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                FileKind::Error => {
                    sqlx::query(CREATE_OUTCOME_STAGING)
                        .execute(&mut *tx)
                        .await?;
                    copy_in(
                        &mut tx,
                        &format!("COPY fhir_sync_outcome_staging (line, outcome) FROM STDIN {CSV}"),
                        &batch.copy,
                    )
                    .await?;
                    sqlx::query(STORE_OUTCOMES)
                        .bind(target.file_id)
                        .bind(target.run_id)
                        .execute(&mut *tx)
                        .await?;
                }
                FileKind::Deleted => {
                    if !batch.delete_ids.is_empty() {
                        sqlx::query(APPLY_DELETIONS)
                            .bind(&target.source)
                            .bind(target.run_id)
                            .bind(&batch.delete_types)
                            .bind(&batch.delete_ids)
                            .bind(&batch.delete_times)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
        }
        // On an error the transaction rolls back when `tx` drops (or the connection closes).
        self.record(&mut tx, batch, through_line).await?;
        tx.commit().await?;
        connection.release();
        self.committed(batch, through_line);
        Ok(())
    }
}

/// A batch whose rows sit in the staging table of an open transaction, waiting for their turn
/// to merge. Dropped without [`Flusher::finish_staged`], its connection is closed, which rolls
/// the transaction back.
struct Staged {
    connection: ConnectionGuard,
    /// The batch, its COPY data handed back already.
    batch: Batch,
    through_line: u64,
}

/// Opens a transaction on a connection of its own and COPYs the batch into its staging table.
/// Returns the staged batch and the batch's COPY buffer, free for the next batch.
///
/// It overlaps with the previous batch's merge only on a connection the pool has idle: it
/// never waits for a second connection while the previous batch holds one, so files loading at
/// once cannot starve the pool (and whoever else needs it) between them. Without an idle
/// connection it waits for `turn`, the previous batch's end, and takes the one that freed.
async fn stage(
    pool: &PgPool,
    mut batch: Batch,
    through_line: u64,
    turn: tokio::sync::oneshot::Receiver<()>,
) -> Result<(Staged, Vec<u8>), LoadError> {
    let connection = match pool.try_acquire() {
        Some(connection) => connection,
        None => {
            // Sent or dropped when the previous batch is done, whether it committed or not.
            let _ = turn.await;
            pool.acquire().await?
        }
    };
    let mut connection = ConnectionGuard(Some(connection));
    let conn = connection.get();
    // A plain BEGIN rather than sqlx's transaction type, which would borrow the connection;
    // `ConnectionGuard` closes the connection (ending the transaction) if the batch is dropped
    // before its COMMIT. The commit need not wait for its WAL flush (see `Flusher::flush`).
    sqlx::raw_sql("BEGIN; SET LOCAL synchronous_commit = off")
        .execute(&mut *conn)
        .await?;
    if batch.rows > 0 {
        sqlx::query(CREATE_STAGING).execute(&mut *conn).await?;
        copy_in(
            conn,
            &format!("COPY fhir_sync_staging {COPY_COLUMNS} FROM STDIN {CSV}"),
            &batch.copy,
        )
        .await?;
    }
    let buffer = std::mem::take(&mut batch.copy);
    Ok((
        Staged {
            connection,
            batch,
            through_line,
        },
        buffer,
    ))
}

async fn copy_in(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    data: &[u8],
) -> Result<(), sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    // Sent in slices so that the socket buffer, not one huge write, paces the transfer, and so
    // that each pooled connection's write buffer, which keeps the capacity of its largest
    // message, stays small.
    for chunk in data.chunks(128 * 1024) {
        copy.send(chunk).await?;
    }
    copy.finish().await.map(drop)
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "23505")
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
            let target = target();
            let frame = RowFrame::new(&target).unwrap();
            classify(&target, &frame, 7, line.as_bytes(), &mut batch);
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
