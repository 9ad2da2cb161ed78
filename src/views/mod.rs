//! Analytics views: SQL-on-FHIR v2 ViewDefinitions as flat PostgreSQL tables, kept current.
//!
//! `views/*.json` are ViewDefinitions; [`ViewSet::load`] reads and validates them (file and
//! element path in every problem), `compile` turns each into one PostgreSQL query over the
//! warehouse's resources, `materialise` keeps them as tables in schema `sof` (rebuilt into a
//! shadow table and swapped when a definition changes), `refresh` replaces the rows of exactly
//! the resources a run changed or deleted, and `conformance` runs the official test files.
//! Nothing here evaluates FHIRPath in memory: PostgreSQL computes every row. This module does
//! not know about the sync engine; the engine calls [`refresh::refresh_for_run`].

pub mod compile;
pub mod conformance;
pub mod definition;
pub mod fhirpath;
pub mod materialise;
pub mod refresh;

use std::path::{Path, PathBuf};

pub use compile::{CompiledView, OutColumn, compile};
pub use definition::ViewDefinition;

/// Why a view operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// View files with problems, one line per problem (`views/bp.json: select[0]...`).
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("reading {path} failed")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("loading test resources failed")]
    Load(#[from] crate::warehouse::LoadError),
    #[error("no view named {0:?}")]
    Unknown(String),
}

/// One view file, validated and compiled.
#[derive(Debug, Clone)]
pub struct View {
    pub file: PathBuf,
    pub name: String,
    pub definition: ViewDefinition,
    pub compiled: CompiledView,
}

/// The views of a folder, sorted by name, and the schema their tables live in.
#[derive(Debug, Clone, Default)]
pub struct ViewSet {
    pub schema: String,
    pub views: Vec<View>,
}

/// Validates and compiles one ViewDefinition; problems carry the element path.
pub fn prepare(
    definition: &ViewDefinition,
    need_name: bool,
) -> Result<CompiledView, Vec<definition::Problem>> {
    let problems = definition.check(need_name);
    if !problems.is_empty() {
        return Err(problems);
    }
    compile(definition).map_err(|e| {
        vec![definition::Problem {
            path: e.path,
            message: e.message,
        }]
    })
}

impl ViewSet {
    /// Reads every `*.json` in `dir`, for tables in `schema`. A missing folder is an empty
    /// set; every problem of every file is collected.
    pub fn load(dir: &Path, schema: &str) -> Result<ViewSet, ViewError> {
        if !definition::is_sql_name(schema) {
            return Err(ViewError::Invalid(vec![format!(
                "views.schema: {schema:?} is not a sql name"
            )]));
        }
        let empty = ViewSet {
            schema: schema.to_string(),
            views: Vec::new(),
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(empty),
            Err(source) => {
                return Err(ViewError::Read {
                    path: dir.display().to_string(),
                    source,
                });
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut problems = Vec::new();
        let mut views: Vec<View> = Vec::new();
        for file in files {
            let shown = file.display().to_string();
            let text = std::fs::read_to_string(&file).map_err(|source| ViewError::Read {
                path: shown.clone(),
                source,
            })?;
            let definition = match definition::from_json(&text) {
                Ok(d) => d,
                Err(p) => {
                    problems.push(format!("{shown}: {p}"));
                    continue;
                }
            };
            match prepare(&definition, true) {
                Err(ps) => problems.extend(ps.into_iter().map(|p| format!("{shown}: {p}"))),
                Ok(compiled) => {
                    let name = definition.name.clone().unwrap_or_default();
                    if let Some(other) = views.iter().find(|v| v.name == name) {
                        problems.push(format!(
                            "{shown}: name: view {name:?} is already defined in {}",
                            other.file.display()
                        ));
                        continue;
                    }
                    views.push(View {
                        file,
                        name,
                        definition,
                        compiled,
                    });
                }
            }
        }
        if !problems.is_empty() {
            return Err(ViewError::Invalid(problems));
        }
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ViewSet { views, ..empty })
    }

    pub fn get(&self, name: &str) -> Result<&View, ViewError> {
        self.views
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ViewError::Unknown(name.to_string()))
    }
}
