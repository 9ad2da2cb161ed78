//! What the fake server keeps of one kicked-off export: its transaction time, its files and
//! which resources it holds. Apart from the handlers in `export`, so that the server's shared
//! state (`state`) can hold exports without importing the handlers that use it.

use std::collections::HashSet;
use std::sync::Arc;

use time::OffsetDateTime;

use super::data::Dataset;

/// One kicked-off export, from kick-off until it is deleted.
pub(crate) struct Export {
    /// Status and files are only served to tokens of the client that kicked the export off.
    pub(crate) client_id: String,
    pub(crate) transaction_time: OffsetDateTime,
    /// The kick-off URL exactly as received, for the manifest's `request`.
    pub(crate) request: String,
    pub(crate) since: Option<OffsetDateTime>,
    /// The Group exported, for a group-level export.
    pub(crate) group: Option<String>,
    pub(crate) status_polls: u32,
    pub(crate) files: Vec<ExportFile>,
    /// Which resources the export holds besides `_since`: its patients' compartments (a
    /// group's members, the `patient` parameter) minus resources deleted on the server.
    pub(crate) keep: Arc<Keep>,
    /// The first this many of `files` were moved to `error[]` (`Faults::failed_files_in_export`).
    pub(crate) failed_files: usize,
}

/// Which resources an export holds, besides `_since`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Keep {
    /// Patient indices whose compartments are exported; `None`: every patient's.
    pub(crate) patients: Option<HashSet<usize>>,
    /// Resources deleted on the server, (type, index).
    pub(crate) removed: HashSet<(String, usize)>,
}

impl Keep {
    pub(crate) fn everything(&self) -> bool {
        self.patients.is_none() && self.removed.is_empty()
    }

    pub(crate) fn keeps(&self, dataset: &Dataset, resource_type: &str, index: usize) -> bool {
        if self.removed.contains(&(resource_type.to_string(), index)) {
            return false;
        }
        match (&self.patients, dataset.patient_of(resource_type, index)) {
            (None, _) => true,
            (Some(patients), Some(patient)) => patients.contains(&patient),
            (Some(_), None) => false,
        }
    }
}

/// One output file: `count` resources of one type that pass the export's `_since`, starting the
/// scan at data set index `first_index`.
#[derive(Clone, Debug)]
pub(crate) struct ExportFile {
    pub(crate) resource_type: String,
    pub(crate) name: String,
    pub(crate) first_index: usize,
    pub(crate) count: usize,
}
