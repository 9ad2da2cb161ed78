//! Streaming NDJSON loader: bytes → lines → light parse → COPY batches → set-based merge.
//!
//! Memory is bounded by two batches whatever the file size (the next batch is read and parsed
//! while the previous one is staged or commits). Each batch commits its rows, its
//! rejected lines and the file's new line checkpoint in one transaction, so a crash resumes
//! after the last committed batch and loading a finished file again changes nothing. A bad line
//! is recorded (file, line number, reason) and never stops the rest of the file: what
//! PostgreSQL would refuse is caught before COPY (`jsonb`, strict instants, a `lastUpdated` or
//! `lastModified` past the export's `transactionTime` plus [`FUTURE_TOLERANCE`]), and a line
//! that still makes COPY fail is isolated by halving the batch ([`copy_batch`]). A UTF-8
//! byte-order mark at the start of a file is skipped.
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

use time::OffsetDateTime;

use super::{LoadError, jsonb};
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
/// How far past the export's `transactionTime` a `meta.lastUpdated` or deletion `lastModified`
/// may lie (clock skew, resources changed while the export was generated). A time beyond it
/// is rejected: stored, it would win every newer-wins comparison and freeze the row for good.
pub const FUTURE_TOLERANCE: time::Duration = time::Duration::days(1);
/// The UTF-8 byte-order mark some servers write at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

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
    /// For each COPY row: its line number and where it ends in `copy`, so that a row
    /// PostgreSQL refuses can be found and taken out (see [`copy_batch`]).
    row_lines: Vec<u64>,
    row_ends: Vec<usize>,
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

    /// Marks the end of the COPY row just written for `line_number`.
    fn end_row(&mut self, line_number: u64) {
        self.row_lines.push(line_number);
        self.row_ends.push(self.copy.len());
    }

    /// Where COPY row `row` starts and ends in `copy`.
    fn row_range(&self, row: usize) -> std::ops::Range<usize> {
        let start = if row == 0 { 0 } else { self.row_ends[row - 1] };
        start..self.row_ends[row]
    }

    /// Takes the given COPY rows (sorted indexes) out of the batch and records each as a
    /// rejected line with its reason.
    fn take_out_rows(&mut self, refused: &[(usize, String)]) {
        let mut copy = Vec::with_capacity(self.copy.len());
        let mut row_lines = Vec::with_capacity(self.row_lines.len());
        let mut row_ends = Vec::with_capacity(self.row_ends.len());
        let mut next_refused = refused.iter().peekable();
        let mut rejects = Vec::new();
        for row in 0..self.row_lines.len() {
            let range = self.row_range(row);
            if let Some((_, reason)) = next_refused.next_if(|(r, _)| *r == row) {
                rejects.push((self.row_lines[row], reason.clone(), range));
                continue;
            }
            copy.extend_from_slice(&self.copy[range]);
            row_lines.push(self.row_lines[row]);
            row_ends.push(copy.len());
        }
        for (line, reason, range) in rejects {
            let json = row_json(&self.copy[range]).to_vec();
            self.reject(line, reason, &json);
        }
        self.rows -= (self.row_lines.len() - row_lines.len()) as u64;
        self.copy = copy;
        self.row_lines = row_lines;
        self.row_ends = row_ends;
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
    let (committed, transaction_time): (i64, Option<String>) = sqlx::query_as(
        "SELECT f.lines_committed, r.transaction_time
         FROM fhir_sync.run_file f LEFT JOIN fhir_sync.run r ON r.id = f.run_id WHERE f.id = $1",
    )
    .bind(target.file_id)
    .fetch_one(pool)
    .await?;
    // Without a transactionTime (a file loaded outside a run) the cutoff runs from now.
    let not_after = transaction_time
        .as_deref()
        .and_then(fhir::parse_instant)
        .unwrap_or_else(OffsetDateTime::now_utc)
        + FUTURE_TOLERANCE;
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
        not_after,
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
    /// The latest `lastUpdated`/`lastModified` accepted (see [`FUTURE_TOLERANCE`]).
    not_after: OffsetDateTime,
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
                LineRead::Complete => {
                    let mut line = trim_line_end(&self.line);
                    if self.line_number == 1 {
                        line = line.strip_prefix(BOM).unwrap_or(line);
                    }
                    classify(
                        target,
                        frame,
                        self.not_after,
                        self.line_number,
                        line,
                        &mut batch,
                    )
                }
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
        Some((mut batch, through_line)) => {
            flusher.flush(&mut batch, through_line).await?;
            Ok(Some(batch.copy))
        }
        None => Ok(None),
    }
}

/// Compares the manifest's count with what the file's attempts loaded and rejected in total,
/// and records the verdict on the file. Not for error files: their `count` (when a server
/// sends one) is of the resources that failed, not of the OperationOutcome lines, and what
/// they report already makes the run partial.
async fn check_count(pool: &PgPool, file_id: i64) -> Result<Option<String>, LoadError> {
    let mismatch: Option<String> = sqlx::query_scalar(
        "UPDATE fhir_sync.run_file SET count_mismatch =
             CASE WHEN manifest_count IS NOT NULL AND kind <> 'error'
                       AND manifest_count <> resources_loaded + lines_rejected
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
///
/// Reasons name positions and kinds, never a value of the line: they are shown by the API and
/// the status page, and the line may hold patient data (the excerpt, kept in the database
/// only, is there for whoever may read it).
fn classify(
    target: &FileTarget,
    frame: &RowFrame,
    not_after: OffsetDateTime,
    line_number: u64,
    line: &[u8],
    batch: &mut Batch,
) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return; // Blank lines (a trailing newline, say) carry nothing; they are not errors.
    }
    if target.kind == FileKind::Deleted {
        return classify_deletion(not_after, line_number, line, batch);
    }
    let parsed: Light<'_> = match serde_json::from_slice(line) {
        Ok(parsed) => parsed,
        Err(e) => return batch.reject(line_number, json_error_reason(&e), line),
    };
    let resource_type = parsed.resource_type.as_deref().unwrap_or_default();
    if resource_type != target.resource_type {
        let reason = if resource_type.is_empty() {
            "no resourceType".to_string()
        } else if fhir::is_resource_type(resource_type) {
            format!(
                "resourceType {resource_type:?} in a file of {:?}",
                target.resource_type
            )
        } else {
            format!(
                "resourceType is not a FHIR resource type, in a file of {:?}",
                target.resource_type
            )
        };
        return batch.reject(line_number, reason, line);
    }
    // What PostgreSQL's jsonb would refuse fails a whole COPY batch; caught here, it costs one
    // line. (`copy_batch` isolates whatever this misses.)
    if let Some(refusal) = jsonb::refusal(line) {
        return batch.reject(line_number, refusal.to_string(), line);
    }
    match target.kind {
        FileKind::Output => {
            let id = parsed.id.as_deref().unwrap_or_default();
            if !fhir::is_valid_id(id) {
                let reason = if id.is_empty() {
                    "no id".to_string()
                } else {
                    "id is not a valid FHIR id".to_string()
                };
                return batch.reject(line_number, reason, line);
            }
            let meta = parsed.meta.as_ref();
            let version_id = meta.and_then(|m| m.version_id.as_deref());
            if let Some(version) = version_id
                && !fhir::is_valid_id(version)
            {
                return batch.reject(line_number, "meta.versionId is not a valid id".into(), line);
            }
            let last_updated = meta.and_then(|m| m.last_updated.as_deref());
            if let Some(instant) = last_updated
                && let Err(reason) = check_time(instant, not_after)
            {
                return batch.reject(line_number, format!("meta.lastUpdated {reason}"), line);
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
    batch.end_row(line_number);
    batch.rows += 1;
}

/// Why a line is not JSON, by kind and column only: serde_json's own message may quote a value
/// of the line (`invalid type: string "Smith"`).
fn json_error_reason(error: &serde_json::Error) -> String {
    let kind = match error.classify() {
        serde_json::error::Category::Syntax => "a syntax error",
        serde_json::error::Category::Eof => "it ends early",
        serde_json::error::Category::Data => "a field of the wrong type",
        serde_json::error::Category::Io => "a read error",
    };
    format!("not valid JSON: {kind} at column {}", error.column())
}

/// Whether a `lastUpdated` or `lastModified` is an instant PostgreSQL can store and not past
/// `not_after`; the error completes a sentence starting with the field's name.
fn check_time(text: &str, not_after: OffsetDateTime) -> Result<(), String> {
    match fhir::parse_instant(text) {
        None => Err("is not a FHIR instant".into()),
        Some(at) if at > not_after => Err(format!(
            "is more than {} hours after the export's transactionTime",
            FUTURE_TOLERANCE.whole_hours()
        )),
        Some(_) => Ok(()),
    }
}

/// The JSON text of a COPY row: the row ends with it, quoted with \x01, and JSON text holds no
/// raw \x01.
fn row_json(row: &[u8]) -> &[u8] {
    let body = row.strip_suffix(b"\x01\n").unwrap_or(row);
    match memchr::memrchr(0x01, body) {
        Some(quote) => &body[quote + 1..],
        None => body,
    }
}

/// A line of a `deleted` file: every entry must be a DELETE of `Type/id`, else the whole line
/// is rejected and none of its entries applied (a half-applied Bundle would be hard to explain).
fn classify_deletion(not_after: OffsetDateTime, line_number: u64, line: &[u8], batch: &mut Batch) {
    let parsed: DeletionBundle<'_> = match serde_json::from_slice(line) {
        Ok(parsed) => parsed,
        Err(e) => return batch.reject(line_number, json_error_reason(&e), line),
    };
    match parsed.resource_type.as_deref() {
        Some("Bundle") => {}
        Some(_) => {
            return batch.reject(
                line_number,
                "resourceType is not \"Bundle\" in a file of \"Bundle\"".into(),
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
                format!("entry {n}: request.method is not \"DELETE\""),
                line,
            );
        }
        let url = request.and_then(|r| r.url.as_deref()).unwrap_or_default();
        let Some((resource_type, id)) = deleted_type_and_id(url) else {
            return batch.reject(
                line_number,
                format!("entry {n}: request.url is not Type/id"),
                line,
            );
        };
        let at = entry
            .response
            .as_ref()
            .and_then(|r| r.last_modified.as_deref());
        if let Some(at) = at
            && let Err(reason) = check_time(at, not_after)
        {
            return batch.reject(
                line_number,
                format!("entry {n}: response.lastModified {reason}"),
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

    async fn flush(&mut self, batch: &mut Batch, through_line: u64) -> Result<(), LoadError> {
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
                        match copy_batch(
                            &mut savepoint,
                            &format!("COPY fhir_sync.resource {COPY_COLUMNS} FROM STDIN {CSV}"),
                            target.kind,
                            batch,
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
                        copy_batch(
                            &mut tx,
                            &format!("COPY fhir_sync_staging {COPY_COLUMNS} FROM STDIN {CSV}"),
                            target.kind,
                            batch,
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
                    copy_batch(
                        &mut tx,
                        &format!("COPY fhir_sync_outcome_staging (line, outcome) FROM STDIN {CSV}"),
                        target.kind,
                        &mut *batch,
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
        copy_batch(
            conn,
            &format!("COPY fhir_sync_staging {COPY_COLUMNS} FROM STDIN {CSV}"),
            FileKind::Output,
            &mut batch,
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

/// COPYs a batch, taking out any row PostgreSQL refuses instead of failing the batch.
///
/// The checks before COPY ([`jsonb::refusal`], the instant and id checks) catch what they
/// know of; whatever else PostgreSQL refuses as data (SQLSTATE class 22, or 54 for a nesting
/// past its stack) must still cost only its own line. So the COPY runs in a savepoint: on such
/// an error the savepoint is rolled back, the refused rows are found by halving the batch (each
/// half tried in a savepoint of its own and rolled back), taken out as rejected lines, and the
/// rest is COPYed again. The happy path pays one `SAVEPOINT` per batch, no per-line work.
async fn copy_batch(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    kind: FileKind,
    batch: &mut Batch,
) -> Result<(), sqlx::Error> {
    loop {
        sqlx::raw_sql("SAVEPOINT fhir_sync_copy")
            .execute(&mut *conn)
            .await?;
        let error = match copy_in(conn, statement, &batch.copy).await {
            Ok(()) => return Ok(()),
            Err(e) if refused_as_data(&e).is_some() => e,
            Err(e) => return Err(e),
        };
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT fhir_sync_copy")
            .execute(&mut *conn)
            .await?;
        let refused = find_refused_rows(conn, kind, batch).await?;
        if refused.is_empty() {
            // The batch fails, yet no part of it alone does: nothing to isolate.
            return Err(error);
        }
        tracing::warn!(
            lines = refused.len(),
            "PostgreSQL refused lines that passed the checks before COPY; they are rejected"
        );
        batch.take_out_rows(&refused);
        if batch.rows == 0 {
            return Ok(());
        }
    }
}

/// The rows of `batch` that PostgreSQL refuses on their own, with a reason each, sorted. Rows
/// are tried in halves against a staging table of the target's column types (same input
/// functions, no constraints), inside savepoints that are always rolled back.
async fn find_refused_rows(
    conn: &mut sqlx::PgConnection,
    kind: FileKind,
    batch: &Batch,
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    let (create, copy) = match kind {
        FileKind::Error => (
            CREATE_OUTCOME_STAGING,
            format!("COPY fhir_sync_outcome_staging (line, outcome) FROM STDIN {CSV}"),
        ),
        _ => (
            CREATE_STAGING,
            format!("COPY fhir_sync_staging {COPY_COLUMNS} FROM STDIN {CSV}"),
        ),
    };
    sqlx::query(create).execute(&mut *conn).await?;
    let mut refused = Vec::new();
    let mut ranges = vec![(0, batch.row_lines.len())];
    while let Some((first, end)) = ranges.pop() {
        if first >= end {
            continue;
        }
        let data = &batch.copy[batch.row_range(first).start..batch.row_ends[end - 1]];
        sqlx::raw_sql("SAVEPOINT fhir_sync_probe")
            .execute(&mut *conn)
            .await?;
        let outcome = copy_in(conn, &copy, data).await;
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT fhir_sync_probe")
            .execute(&mut *conn)
            .await?;
        let code = match outcome {
            Ok(()) => continue,
            Err(e) => match refused_as_data(&e) {
                Some(code) => code,
                None => return Err(e),
            },
        };
        if end - first == 1 {
            refused.push((first, refusal_reason(&code)));
        } else {
            let middle = first + (end - first) / 2;
            ranges.push((middle, end));
            ranges.push((first, middle));
        }
    }
    refused.sort_unstable_by_key(|(row, _)| *row);
    Ok(refused)
}

/// The SQLSTATE of an error that says PostgreSQL refused the data itself: class 22 (data
/// exception), 54 (a program limit, such as the stack depth a deep nesting exhausts), or
/// 0A000, which jsonb raises for a `\u` escape beyond ASCII in a database not in UTF-8.
fn refused_as_data(error: &sqlx::Error) -> Option<String> {
    let code = error.as_database_error()?.code()?;
    (code.starts_with("22") || code.starts_with("54") || code == "0A000").then(|| code.into_owned())
}

/// A rejection reason for a line PostgreSQL refused. PostgreSQL's message quotes the value it
/// refused, so only the SQLSTATE and its standard name are kept.
fn refusal_reason(code: &str) -> String {
    let name = match code {
        "22003" => "numeric value out of range",
        "22007" => "invalid datetime format",
        "22008" => "datetime field overflow",
        "22009" => "invalid time zone displacement",
        "22021" => "character not in repertoire",
        "22P02" => "invalid text representation",
        "22P05" => "untranslatable character",
        "54001" => "statement too complex",
        "0A000" => "feature not supported",
        _ if code.starts_with("22") => "data exception",
        _ => "program limit exceeded",
    };
    format!("PostgreSQL refused the line (SQLSTATE {code}: {name})")
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
                r#"{"resourceType":"Patient","id":"Smith b"}"#,
                Some("id is not a valid FHIR id"),
            ),
            (
                r#"{"resourceType":"Patient","id":42}"#,
                Some("not valid JSON: a field of the wrong type at column"),
            ),
            (
                r#"{"resourceType":"Smith","id":"p1"}"#,
                Some("resourceType is not a FHIR resource type"),
            ),
            (
                r#"{"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"2025-01-01T23:00:00Z"}}"#,
                None,
            ),
            (
                r#"{"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"2025-01-02T00:00:01Z"}}"#,
                Some("meta.lastUpdated is more than 24 hours after the export's transactionTime"),
            ),
            (
                r#"{"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"0000-01-01T00:00:00Z"}}"#,
                Some("meta.lastUpdated is not a FHIR instant"),
            ),
            (
                r#"{"resourceType":"Patient","id":"p1","x":1e200000}"#,
                Some("outside the range PostgreSQL numeric can hold"),
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
                Some("byte 45: a \\u0000 escape"),
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
            let not_after = fhir::parse_instant("2025-01-01T00:00:00Z").unwrap() + FUTURE_TOLERANCE;
            classify(&target, &frame, not_after, 7, line.as_bytes(), &mut batch);
            match expected {
                None => assert!(
                    batch.reject_reasons.is_empty(),
                    "{line}: {:?}",
                    batch.reject_reasons
                ),
                Some(reason) => {
                    for value in ["Smith", "yesterday", "0000-01-01", "42"] {
                        assert!(!batch.reject_reasons[0].contains(value), "{line}");
                    }
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
