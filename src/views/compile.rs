//! ViewDefinition → one PostgreSQL query over the warehouse's resources. Pure: no IO.
//!
//! A FHIRPath collection becomes a jsonb array expression (SQL NULL counts as empty), member
//! navigation a lax SQL/JSON path (`$."name"[*]."family"[*]`, which flattens like FHIRPath),
//! a singleton a jsonb scalar and a boolean a SQL boolean, so PostgreSQL evaluates everything.
//! The select tree becomes LATERAL joins: `forEach` over `jsonb_array_elements`,
//! `forEachOrNull` as a LEFT JOIN, `repeat` as a `WITH RECURSIVE`, `unionAll` as `UNION ALL`.
//! Identifiers are always quoted and every constant, string and path is an escaped literal;
//! nothing from a view file is pasted into SQL unquoted. The few helper functions the SQL calls
//! (`fhir_sync.sof_*`: raise an error, boundaries, reference keys) live in the migrations.

use std::collections::HashMap;

use super::definition::{Column, Select, ViewDefinition};
use super::fhirpath::{self, BinOp, Expr};

/// The table column a view column becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutColumn {
    pub name: String,
    /// The PostgreSQL type (`text`, `integer`, `jsonb`, ...).
    pub sql_type: String,
}

/// A compiled view: its columns and the query producing its rows.
#[derive(Debug, Clone)]
pub struct CompiledView {
    pub resource: String,
    /// The view's columns in order, without the key columns.
    pub columns: Vec<OutColumn>,
    select: String,
    conditions: String,
}

/// The key columns every query and table has before the view's own columns.
pub const KEY_COLUMNS: [&str; 2] = ["_source", "_resource_id"];

impl CompiledView {
    /// The query over every loaded, non-deleted resource of the view's type.
    pub fn query(&self) -> String {
        format!("{} WHERE {}", self.select, self.conditions)
    }

    /// The query restricted by an extra condition on the resource row `r` (`r.source`,
    /// `r.id`, ...). The condition is SQL written by fhir-sync, never taken from a view file.
    pub fn query_where(&self, condition: &str) -> String {
        format!(
            "{} WHERE {} AND ({condition})",
            self.select, self.conditions
        )
    }
}

/// Why a view does not compile, at an element path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CompileError {
    pub path: String,
    pub message: String,
}

/// Quotes an identifier with PostgreSQL's rules.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An escaped string literal (standard_conforming_strings, on since PostgreSQL 9.1).
pub fn lit(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A JSON string inside an SQL/JSON path.
fn jp_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// What the compiler knows statically about a value's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Any,
    Boolean,
    String,
    Integer,
    Decimal,
    Date,
    DateTime,
    Time,
}

/// How a value is represented in SQL.
#[derive(Debug, Clone)]
enum Repr {
    /// A lax SQL/JSON path applied to a jsonb value: a collection.
    Path { root: String, path: String },
    /// A jsonb array (or NULL): a collection.
    Coll(String),
    /// A jsonb scalar or object, or NULL: at most one item.
    Scalar(String),
    /// A SQL boolean, NULL when empty.
    Bool(String),
}

#[derive(Debug, Clone)]
struct V {
    repr: Repr,
    ty: Ty,
}

impl V {
    fn new(repr: Repr, ty: Ty) -> V {
        V { repr, ty }
    }

    fn coll(&self) -> String {
        match &self.repr {
            Repr::Path { root, path } => {
                format!(
                    "jsonb_path_query_array({root}, {})",
                    lit(&format!("lax {path}"))
                )
            }
            Repr::Coll(c) => c.clone(),
            Repr::Scalar(s) => format!("jsonb_path_query_array({s}, 'lax $')"),
            Repr::Bool(b) => format!("jsonb_path_query_array(to_jsonb({b}), 'lax $')"),
        }
    }

    /// The first item as jsonb, NULL when empty.
    fn scalar(&self) -> String {
        match &self.repr {
            Repr::Path { root, path } => {
                format!(
                    "jsonb_path_query_first({root}, {})",
                    lit(&format!("lax {path}"))
                )
            }
            Repr::Coll(c) => format!("({c} -> 0)"),
            Repr::Scalar(s) => s.clone(),
            Repr::Bool(b) => format!("to_jsonb({b})"),
        }
    }

    fn text(&self) -> String {
        format!("({} #>> '{{}}')", self.scalar())
    }

    fn num(&self) -> String {
        format!("({} #>> '{{}}')::numeric", self.scalar())
    }

    /// Singleton evaluation as a boolean: NULL when empty or not a boolean.
    fn boolean(&self) -> String {
        match &self.repr {
            Repr::Bool(b) => b.clone(),
            Repr::Scalar(s) => {
                format!("(CASE ({s})::text WHEN 'true' THEN true WHEN 'false' THEN false END)")
            }
            _ => format!(
                "(CASE ({})::text WHEN '[true]' THEN true WHEN '[false]' THEN false END)",
                self.coll()
            ),
        }
    }

    /// The value as a path root: `$` addresses its items.
    fn path(&self) -> (String, String) {
        match &self.repr {
            Repr::Path { root, path } => (root.clone(), path.clone()),
            Repr::Scalar(s) => (s.clone(), "$".into()),
            _ => (self.coll(), "$[*]".into()),
        }
    }

    fn exists(&self) -> String {
        match &self.repr {
            Repr::Path { root, path } => format!(
                "coalesce(jsonb_path_exists({root}, {}), false)",
                lit(&format!("lax {path}"))
            ),
            Repr::Scalar(s) => format!("({s} IS NOT NULL)"),
            Repr::Bool(b) => format!("({b} IS NOT NULL)"),
            Repr::Coll(c) => format!("(coalesce(jsonb_array_length({c}), 0) > 0)"),
        }
    }
}

/// Where an expression is evaluated: the focus item and the row index.
#[derive(Debug, Clone)]
struct Scope {
    /// A jsonb item (or NULL inside a `forEachOrNull` that found nothing).
    this: String,
    /// `$index` inside `where`/`select`, else NULL.
    index: String,
    /// `%rowIndex`: the index of the focus in its `forEach`/`repeat`, 0 at the resource.
    row_index: String,
}

struct Constant {
    /// The value as a jsonb scalar expression.
    sql: String,
    ty: Ty,
    json: serde_json::Value,
}

struct Compiler {
    view: String,
    resource: String,
    constants: HashMap<String, Constant>,
    next: usize,
}

/// A compiled select: a SELECT statement and the columns it yields.
struct Node {
    sql: String,
    columns: Vec<OutColumn>,
}

/// The resource row and item the top of a view reads.
const RESOURCE: &str = "r.resource";

/// Compiles a structurally valid view (see `ViewDefinition::check`).
pub fn compile(view: &ViewDefinition) -> Result<CompiledView, CompileError> {
    let resource = view.resource.clone().ok_or_else(|| CompileError {
        path: "resource".into(),
        message: "a view needs a resource type".into(),
    })?;
    let mut constants = HashMap::new();
    for (i, c) in view.constant.iter().enumerate() {
        let (ty, value) = c.value().map_err(|message| CompileError {
            path: format!("constant[{i}]"),
            message,
        })?;
        let ty = match ty {
            "Boolean" => Ty::Boolean,
            "Integer" | "PositiveInt" | "UnsignedInt" | "Integer64" => Ty::Integer,
            "Decimal" => Ty::Decimal,
            "Date" => Ty::Date,
            "DateTime" | "Instant" => Ty::DateTime,
            "Time" => Ty::Time,
            _ => Ty::String,
        };
        let json = value.clone();
        constants.insert(
            c.name.clone(),
            Constant {
                sql: format!("{}::jsonb", lit(&json.to_string())),
                ty,
                json,
            },
        );
    }
    let mut compiler = Compiler {
        view: view.name.clone().unwrap_or_else(|| "view".into()),
        resource: resource.clone(),
        constants,
        next: 0,
    };
    let scope = Scope {
        this: RESOURCE.into(),
        index: "NULL::integer".into(),
        row_index: "0".into(),
    };
    let top = Select {
        select: view.select.clone(),
        ..Select::default()
    };
    let node = compiler.body(&top, &scope, "")?;
    let mut conditions = vec![
        format!("r.resource_type = {}", lit(&resource)),
        "r.deleted_at IS NULL".into(),
        "r.resource IS NOT NULL".into(),
    ];
    for (i, w) in view.where_.iter().enumerate() {
        let at = format!("where[{i}].path");
        let v = compiler.path(&w.path, &scope, &at)?;
        let condition = match (&v.repr, v.ty) {
            (Repr::Bool(b), _) => format!("coalesce({b}, false)"),
            (_, Ty::Any | Ty::Boolean) => format!(
                "fhir_sync.sof_where({}, {})",
                v.coll(),
                lit(&format!(
                    "view {:?}: {at} is not boolean for a resource",
                    compiler.view
                ))
            ),
            _ => {
                return Err(CompileError {
                    path: at,
                    message: "a where path must be boolean".into(),
                });
            }
        };
        conditions.push(condition);
    }
    let outputs: Vec<String> = node
        .columns
        .iter()
        .map(|c| format!("v.{}", ident(&c.name)))
        .collect();
    let select = format!(
        "SELECT r.source AS \"_source\", r.id AS \"_resource_id\"{}{} FROM fhir_sync.resource AS r CROSS JOIN LATERAL ({}) AS v",
        if outputs.is_empty() { "" } else { ", " },
        outputs.join(", "),
        node.sql
    );
    Ok(CompiledView {
        resource,
        columns: node.columns,
        select,
        conditions: conditions.join(" AND "),
    })
}

/// The PostgreSQL type of a column: its `ansi/type` tag, else the spec's map of FHIR types.
fn column_type(col: &Column, at: &str) -> Result<String, CompileError> {
    if col.collection == Some(true) {
        return Ok("jsonb".into());
    }
    if let Some(tag) = col.tag.iter().find(|t| t.name == "ansi/type") {
        if !is_type_name(&tag.value) {
            return Err(CompileError {
                path: format!("{at}.tag"),
                message: format!("{:?} is not an SQL type name", tag.value),
            });
        }
        return Ok(tag.value.to_lowercase());
    }
    Ok(match col.type_.as_deref() {
        Some("boolean") => "boolean",
        Some("integer" | "positiveInt" | "unsignedInt") => "integer",
        Some("integer64") => "bigint",
        Some("decimal") => "numeric",
        Some(
            "string" | "code" | "id" | "uri" | "url" | "canonical" | "oid" | "uuid" | "markdown"
            | "base64Binary" | "xhtml",
        ) => "text",
        // FHIR dates and times may be partial (`2010`, `2010-10`), which date and timestamp
        // columns cannot hold; they stay ISO text unless an ansi/type tag says otherwise.
        Some("date" | "dateTime" | "instant" | "time") => "text",
        _ => "jsonb",
    }
    .into())
}

/// `VARCHAR(64)`, `TIMESTAMP WITH TIME ZONE`, `NUMERIC(10, 2)`: words and a size, nothing else.
fn is_type_name(t: &str) -> bool {
    let (words, size) = match t.find('(') {
        Some(open) => (&t[..open], Some(&t[open..])),
        None => (t, None),
    };
    let words_ok = !words.trim().is_empty()
        && words
            .split_whitespace()
            .all(|w| w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        && words
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic());
    let size_ok = size.is_none_or(|s| {
        s.ends_with(')')
            && s[1..s.len() - 1]
                .split(',')
                .all(|n| !n.trim().is_empty() && n.trim().chars().all(|c| c.is_ascii_digit()))
    });
    words_ok && size_ok
}

fn capitalise(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) => c.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

const FUNCTIONS: &[&str] = &[
    "where",
    "select",
    "exists",
    "empty",
    "first",
    "last",
    "tail",
    "skip",
    "take",
    "single",
    "count",
    "not",
    "distinct",
    "all",
    "allTrue",
    "anyTrue",
    "allFalse",
    "anyFalse",
    "iif",
    "join",
    "ofType",
    "as",
    "is",
    "extension",
    "getResourceKey",
    "getReferenceKey",
    "lowBoundary",
    "highBoundary",
    "hasValue",
    "toString",
    "toInteger",
    "toDecimal",
    "length",
    "upper",
    "lower",
    "trim",
    "startsWith",
    "endsWith",
    "contains",
    "matches",
    "replace",
    "replaceMatches",
    "substring",
    "indexOf",
    "split",
    "combine",
    "union",
    "abs",
    "ceiling",
    "floor",
    "round",
    "truncate",
    "convertsToInteger",
    "convertsToDecimal",
    "convertsToBoolean",
    "toBoolean",
    "isDistinct",
    "intersect",
    "exclude",
    "subsetOf",
    "supersetOf",
];

/// The FHIRPath primitive type names and the type the compiler tracks for them.
fn primitive_ty(t: &str) -> Option<Ty> {
    Some(match t {
        "boolean" | "Boolean" => Ty::Boolean,
        "string" | "code" | "id" | "uri" | "url" | "canonical" | "oid" | "uuid" | "markdown"
        | "base64Binary" | "String" => Ty::String,
        "integer" | "positiveInt" | "unsignedInt" | "integer64" | "Integer" => Ty::Integer,
        "decimal" | "Decimal" => Ty::Decimal,
        "date" | "Date" => Ty::Date,
        "dateTime" | "instant" | "DateTime" => Ty::DateTime,
        "time" | "Time" => Ty::Time,
        _ => return None,
    })
}

/// What a member's name says about its type (`birthDate`, `valueDateTime`), for boundaries.
fn member_ty(name: &str) -> Ty {
    if name.ends_with("DateTime") || name.ends_with("Instant") {
        Ty::DateTime
    } else if name.ends_with("Date") {
        Ty::Date
    } else if name.ends_with("Time") {
        Ty::Time
    } else {
        Ty::Any
    }
}

impl Compiler {
    fn alias(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    fn path(&mut self, text: &str, scope: &Scope, at: &str) -> Result<V, CompileError> {
        let expr = fhirpath::parse(text).map_err(|e| CompileError {
            path: at.to_string(),
            message: format!("FHIRPath does not parse: {e}"),
        })?;
        self.expr(&expr, scope, at)
    }

    /// A select's own rows: iteration (if any) around its body.
    fn node(&mut self, sel: &Select, scope: &Scope, at: &str) -> Result<Node, CompileError> {
        let (items, or_null) = if let Some(p) = &sel.for_each {
            let v = self.path(p, scope, &format!("{at}.forEach"))?;
            (v.coll(), false)
        } else if let Some(p) = &sel.for_each_or_null {
            let v = self.path(p, scope, &format!("{at}.forEachOrNull"))?;
            (v.coll(), true)
        } else if let Some(paths) = &sel.repeat {
            return self.repeat(sel, paths, scope, at);
        } else {
            return self.body(sel, scope, at);
        };
        let f = self.alias("f");
        let inner_scope = Scope {
            this: format!("{f}.v"),
            index: "NULL::integer".into(),
            row_index: format!("({f}.i - 1)"),
        };
        let inner = self.body(sel, &inner_scope, at)?;
        let b = self.alias("b");
        let list = |alias: &str, columns: &[OutColumn]| {
            columns
                .iter()
                .map(|c| format!("{alias}.{}", ident(&c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rows = format!(
            "SELECT {} FROM jsonb_array_elements({items}) WITH ORDINALITY AS {f}(v, i) CROSS JOIN LATERAL ({}) AS {b}",
            list(&b, &inner.columns),
            inner.sql
        );
        if !or_null {
            return Ok(Node {
                sql: rows,
                columns: inner.columns,
            });
        }
        let o = self.alias("o");
        let q = self.alias("q");
        Ok(Node {
            sql: format!(
                "SELECT {} FROM (SELECT 1) AS {o} LEFT JOIN LATERAL ({rows}) AS {q} ON true",
                list(&q, &inner.columns)
            ),
            columns: inner.columns,
        })
    }

    fn repeat(
        &mut self,
        sel: &Select,
        paths: &[String],
        scope: &Scope,
        at: &str,
    ) -> Result<Node, CompileError> {
        let t = self.alias("t");
        let step_scope = Scope {
            this: format!("{t}.v"),
            index: "NULL::integer".into(),
            row_index: "0".into(),
        };
        let mut start = Vec::new();
        let mut step = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            let p_at = format!("{at}.repeat[{i}]");
            start.push(format!(
                "coalesce({}, '[]'::jsonb)",
                self.path(p, scope, &p_at)?.coll()
            ));
            step.push(format!(
                "coalesce({}, '[]'::jsonb)",
                self.path(p, &step_scope, &p_at)?.coll()
            ));
        }
        // Each item carries the ordinals of its path from the start, so that ordering by them
        // numbers the items depth-first, as FHIRPath's repeat() lists them (`%rowIndex`).
        let f = self.alias("f");
        let e = self.alias("e");
        let inner_scope = Scope {
            this: format!("{f}.v"),
            index: "NULL::integer".into(),
            row_index: format!("{f}.i"),
        };
        let inner = self.body(sel, &inner_scope, at)?;
        let b = self.alias("b");
        let columns: Vec<String> = inner
            .columns
            .iter()
            .map(|c| format!("{b}.{}", ident(&c.name)))
            .collect();
        Ok(Node {
            sql: format!(
                "SELECT {} FROM (WITH RECURSIVE {t}(v, o) AS (SELECT {e}.v, ARRAY[{e}.i] FROM jsonb_array_elements({}) WITH ORDINALITY AS {e}(v, i) UNION ALL SELECT {e}.v, {t}.o || {e}.i FROM {t} CROSS JOIN LATERAL jsonb_array_elements({}) WITH ORDINALITY AS {e}(v, i)) SELECT {t}.v, (row_number() OVER (ORDER BY {t}.o) - 1) AS i FROM {t}) AS {f} CROSS JOIN LATERAL ({}) AS {b}",
                columns.join(", "),
                start.join(" || "),
                step.join(" || "),
                inner.sql
            ),
            columns: inner.columns,
        })
    }

    /// Columns, nested selects and unionAll of one select, evaluated on `scope`.
    fn body(&mut self, sel: &Select, scope: &Scope, at: &str) -> Result<Node, CompileError> {
        let k = self.alias("k");
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        let mut columns = Vec::new();
        for (i, col) in sel.column.iter().enumerate() {
            let col_at = format!("{at}{}column[{i}]", if at.is_empty() { "" } else { "." });
            let v = self.path(&col.path, scope, &format!("{col_at}.path"))?;
            let sql_type = column_type(col, &col_at)?;
            let input = format!("c{i}");
            let value = format!("{k}.{input}");
            let output = if col.collection == Some(true) {
                inputs.push(format!("{} AS {input}", v.coll()));
                format!("coalesce({value}, '[]'::jsonb)")
            } else {
                match &v.repr {
                    Repr::Bool(b) => {
                        inputs.push(format!("{b} AS {input}"));
                        if sql_type == "boolean" {
                            value
                        } else if sql_type == "jsonb" {
                            format!("to_jsonb({value})")
                        } else {
                            format!("({value})::text::{sql_type}")
                        }
                    }
                    Repr::Scalar(_) => {
                        inputs.push(format!("{} AS {input}", v.scalar()));
                        convert(&value, &sql_type)
                    }
                    _ => {
                        inputs.push(format!("{} AS {input}", v.coll()));
                        let first = format!("({value} -> 0)");
                        let message = format!(
                            "view {:?} column {:?}: several values for the resource with id ",
                            self.view, col.name
                        );
                        format!(
                            "CASE WHEN jsonb_array_length({value}) > 1 THEN fhir_sync.sof_fail({} || r.id, NULL::{sql_type}) ELSE {} END",
                            lit(&message),
                            convert(&first, &sql_type)
                        )
                    }
                }
            };
            outputs.push(format!("{output} AS {}", ident(&col.name)));
            columns.push(OutColumn {
                name: col.name.clone(),
                sql_type,
            });
        }
        let mut from = if inputs.is_empty() {
            format!("(SELECT 1) AS {k}")
        } else {
            // OFFSET 0 keeps PostgreSQL from inlining the inputs into every use below.
            format!("(SELECT {} OFFSET 0) AS {k}", inputs.join(", "))
        };
        for (i, sub) in sel.select.iter().enumerate() {
            let sub_at = format!("{at}{}select[{i}]", if at.is_empty() { "" } else { "." });
            let node = self.node(sub, scope, &sub_at)?;
            let s = self.alias("s");
            from.push_str(&format!(" CROSS JOIN LATERAL ({}) AS {s}", node.sql));
            for c in node.columns {
                outputs.push(format!("{s}.{}", ident(&c.name)));
                columns.push(c);
            }
        }
        if !sel.union_all.is_empty() {
            let mut branches = Vec::new();
            let mut branch_columns = None;
            for (i, branch) in sel.union_all.iter().enumerate() {
                let b_at = format!("{at}{}unionAll[{i}]", if at.is_empty() { "" } else { "." });
                let node = self.node(branch, scope, &b_at)?;
                let names: Vec<&str> = node.columns.iter().map(|c| c.name.as_str()).collect();
                if let Some(first) = &branch_columns {
                    let first: &Vec<OutColumn> = first;
                    let first_names: Vec<&str> = first.iter().map(|c| c.name.as_str()).collect();
                    if first_names != names {
                        return Err(CompileError {
                            path: b_at,
                            message:
                                "unionAll branches must have the same columns in the same order"
                                    .into(),
                        });
                    }
                }
                // Branches may type a column differently (text and integer); the first
                // branch's types win and the others are cast to them.
                let cast: Vec<String> = match &branch_columns {
                    None => node
                        .columns
                        .iter()
                        .map(|c| format!("u.{}", ident(&c.name)))
                        .collect(),
                    Some(first) => node
                        .columns
                        .iter()
                        .zip(first.iter())
                        .map(|(c, f)| {
                            if c.sql_type == f.sql_type {
                                format!("u.{}", ident(&c.name))
                            } else {
                                format!("(u.{})::text::{}", ident(&c.name), f.sql_type)
                            }
                        })
                        .collect(),
                };
                let with_names: Vec<String> = cast
                    .iter()
                    .zip(node.columns.iter())
                    .map(|(e, c)| format!("{e} AS {}", ident(&c.name)))
                    .collect();
                branches.push(format!(
                    "SELECT {} FROM ({}) AS u",
                    with_names.join(", "),
                    node.sql
                ));
                if branch_columns.is_none() {
                    branch_columns = Some(node.columns);
                }
            }
            let u = self.alias("u");
            from.push_str(&format!(
                " CROSS JOIN LATERAL ({}) AS {u}",
                branches.join(" UNION ALL ")
            ));
            for c in branch_columns.unwrap_or_default() {
                outputs.push(format!("{u}.{}", ident(&c.name)));
                columns.push(c);
            }
        }
        Ok(Node {
            sql: format!("SELECT {} FROM {from}", outputs.join(", ")),
            columns,
        })
    }

    fn err<T>(&self, at: &str, message: impl Into<String>) -> Result<T, CompileError> {
        Err(CompileError {
            path: at.to_string(),
            message: message.into(),
        })
    }

    fn expr(&mut self, e: &Expr, scope: &Scope, at: &str) -> Result<V, CompileError> {
        Ok(match e {
            Expr::Empty => V::new(Repr::Coll("'[]'::jsonb".into()), Ty::Any),
            Expr::Str(s) => V::new(
                Repr::Scalar(format!("{}::jsonb", lit(&jp_string(s)))),
                Ty::String,
            ),
            Expr::Num(n, integer) => V::new(
                Repr::Scalar(format!("{}::jsonb", lit(n))),
                if *integer { Ty::Integer } else { Ty::Decimal },
            ),
            Expr::Bool(b) => V::new(Repr::Bool(b.to_string()), Ty::Boolean),
            Expr::Temporal(t) => {
                let (text, ty) = match t.strip_prefix('T') {
                    Some(time) => (time, Ty::Time),
                    None if t.contains('T') => (t.as_str(), Ty::DateTime),
                    None => (t.as_str(), Ty::Date),
                };
                V::new(
                    Repr::Scalar(format!("{}::jsonb", lit(&jp_string(text)))),
                    ty,
                )
            }
            Expr::This => V::new(Repr::Scalar(scope.this.clone()), Ty::Any),
            Expr::Index => V::new(
                Repr::Scalar(format!("to_jsonb({})", scope.index)),
                Ty::Integer,
            ),
            Expr::Env(name) => match name.as_str() {
                "rowIndex" => V::new(
                    Repr::Scalar(format!("to_jsonb({})", scope.row_index)),
                    Ty::Integer,
                ),
                "resource" | "rootResource" | "context" => {
                    V::new(Repr::Scalar(RESOURCE.into()), Ty::Any)
                }
                _ => match self.constants.get(name) {
                    Some(c) => V::new(Repr::Scalar(c.sql.clone()), c.ty),
                    None => return self.err(at, format!("constant %{name} is not defined")),
                },
            },
            Expr::Member(on, name) => {
                if on.is_none() && *name == self.resource {
                    return Ok(V::new(Repr::Scalar(scope.this.clone()), Ty::Any));
                }
                let base = match on {
                    Some(on) => self.expr(on, scope, at)?,
                    None => V::new(Repr::Scalar(scope.this.clone()), Ty::Any),
                };
                let (root, path) = base.path();
                V::new(
                    Repr::Path {
                        root,
                        path: format!("{path}.{}[*]", jp_string(name)),
                    },
                    member_ty(name),
                )
            }
            Expr::Indexer(on, index) => {
                let base = self.expr(on, scope, at)?;
                let index_sql = match &**index {
                    Expr::Num(n, true) => n.clone(),
                    other => {
                        let i = self.expr(other, scope, at)?;
                        format!("({})::integer", i.text())
                    }
                };
                V::new(
                    Repr::Scalar(format!(
                        "(CASE WHEN ({index_sql}) >= 0 THEN {} -> ({index_sql}) END)",
                        base.coll()
                    )),
                    base.ty,
                )
            }
            Expr::Neg(inner) => {
                let v = self.expr(inner, scope, at)?;
                V::new(Repr::Scalar(format!("to_jsonb(-{})", v.num())), v.ty)
            }
            Expr::TypeOp(is, on, t) => {
                let call = Expr::Call(
                    Some(on.clone()),
                    "ofType".into(),
                    vec![Expr::Member(None, t.clone())],
                );
                let v = self.expr(&call, scope, at)?;
                if *is {
                    V::new(Repr::Bool(v.exists()), Ty::Boolean)
                } else {
                    v
                }
            }
            Expr::Binary(op, a, b) => self.binary(*op, a, b, scope, at)?,
            Expr::Call(on, name, args) => self.call(on.as_deref(), name, args, scope, at)?,
        })
    }

    fn binary(
        &mut self,
        op: BinOp,
        a: &Expr,
        b: &Expr,
        scope: &Scope,
        at: &str,
    ) -> Result<V, CompileError> {
        let a = self.expr(a, scope, at)?;
        let b = self.expr(b, scope, at)?;
        let boolean = |sql: String| V::new(Repr::Bool(sql), Ty::Boolean);
        let scalar = |sql: String, ty: Ty| V::new(Repr::Scalar(sql), ty);
        let single = |v: &V| matches!(v.repr, Repr::Scalar(_) | Repr::Bool(_));
        Ok(match op {
            BinOp::And => boolean(format!("({} AND {})", a.boolean(), b.boolean())),
            BinOp::Or => boolean(format!("({} OR {})", a.boolean(), b.boolean())),
            BinOp::Xor => boolean(format!("({} <> {})", a.boolean(), b.boolean())),
            BinOp::Implies => boolean(format!("((NOT {}) OR {})", a.boolean(), b.boolean())),
            BinOp::Eq | BinOp::Ne => {
                let sql_op = if op == BinOp::Eq { "=" } else { "<>" };
                if single(&a) && single(&b) {
                    boolean(format!("({} {sql_op} {})", a.scalar(), b.scalar()))
                } else {
                    boolean(format!(
                        "(nullif({}, '[]'::jsonb) {sql_op} nullif({}, '[]'::jsonb))",
                        a.coll(),
                        b.coll()
                    ))
                }
            }
            BinOp::Equiv | BinOp::NotEquiv => {
                let sql_op = if op == BinOp::Equiv { "=" } else { "<>" };
                boolean(format!(
                    "(lower(coalesce(nullif({}, '[]'::jsonb), '[]'::jsonb)::text) {sql_op} lower(coalesce(nullif({}, '[]'::jsonb), '[]'::jsonb)::text))",
                    a.coll(),
                    b.coll()
                ))
            }
            BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
                let sql_op = match op {
                    BinOp::Lt => "<",
                    BinOp::Gt => ">",
                    BinOp::Le => "<=",
                    _ => ">=",
                };
                boolean(format!("({} {sql_op} {})", a.scalar(), b.scalar()))
            }
            BinOp::In | BinOp::Contains => {
                let (item, within) = if op == BinOp::In { (a, b) } else { (b, a) };
                let s = item.scalar();
                boolean(format!(
                    "(CASE WHEN {s} IS NULL THEN NULL ELSE coalesce({}, '[]'::jsonb) @> jsonb_build_array({s}) END)",
                    within.coll()
                ))
            }
            BinOp::Union => {
                let u = self.alias("e");
                V::new(
                    Repr::Coll(format!(
                        "(SELECT jsonb_agg(DISTINCT {u}.v) FROM jsonb_array_elements(coalesce({}, '[]'::jsonb) || coalesce({}, '[]'::jsonb)) AS {u}(v))",
                        a.coll(),
                        b.coll()
                    )),
                    a.ty,
                )
            }
            BinOp::Concat => scalar(
                format!(
                    "to_jsonb(coalesce({}, '') || coalesce({}, ''))",
                    a.text(),
                    b.text()
                ),
                Ty::String,
            ),
            BinOp::Add if a.ty == Ty::String || b.ty == Ty::String => scalar(
                format!("to_jsonb({} || {})", a.text(), b.text()),
                Ty::String,
            ),
            BinOp::Add if a.ty == Ty::Any && b.ty == Ty::Any => scalar(
                format!(
                    "(CASE WHEN jsonb_typeof({sa}) = 'string' THEN to_jsonb({ta} || {tb}) ELSE to_jsonb({na} + {nb}) END)",
                    sa = a.scalar(),
                    ta = a.text(),
                    tb = b.text(),
                    na = a.num(),
                    nb = b.num()
                ),
                Ty::Any,
            ),
            BinOp::Add | BinOp::Sub | BinOp::Mul => {
                let sql_op = match op {
                    BinOp::Add => "+",
                    BinOp::Sub => "-",
                    _ => "*",
                };
                let ty = if a.ty == Ty::Integer && b.ty == Ty::Integer {
                    Ty::Integer
                } else {
                    Ty::Decimal
                };
                scalar(format!("to_jsonb({} {sql_op} {})", a.num(), b.num()), ty)
            }
            BinOp::Div => scalar(
                format!("to_jsonb({} / nullif({}, 0))", a.num(), b.num()),
                Ty::Decimal,
            ),
            BinOp::IntDiv => scalar(
                format!("to_jsonb(div({}, nullif({}, 0)))", a.num(), b.num()),
                Ty::Integer,
            ),
            BinOp::Mod => scalar(
                format!("to_jsonb(mod({}, nullif({}, 0)))", a.num(), b.num()),
                a.ty,
            ),
        })
    }

    /// The name in a type-specifier argument (`Quantity`, `FHIR.Quantity`).
    fn type_arg(&self, args: &[Expr], at: &str, function: &str) -> Result<String, CompileError> {
        match args {
            [Expr::Member(_, name)] => Ok(name.clone()),
            [Expr::Str(name)] => Ok(name.clone()),
            _ => self.err(at, format!("{function}() takes one type name")),
        }
    }

    /// A string argument known when compiling (a literal or a constant).
    fn static_string(&self, arg: &Expr, at: &str, function: &str) -> Result<String, CompileError> {
        match arg {
            Expr::Str(s) => Ok(s.clone()),
            Expr::Env(name) => match self.constants.get(name).map(|c| &c.json) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => self.err(at, format!("{function}(): %{name} is not a string")),
                None => self.err(at, format!("constant %{name} is not defined")),
            },
            _ => self.err(
                at,
                format!("{function}() takes a string literal or constant"),
            ),
        }
    }

    fn arity(
        &self,
        args: &[Expr],
        range: std::ops::RangeInclusive<usize>,
        name: &str,
        at: &str,
    ) -> Result<(), CompileError> {
        if range.contains(&args.len()) {
            Ok(())
        } else {
            self.err(
                at,
                format!(
                    "{name}() takes {} arguments, not {}",
                    if range.start() == range.end() {
                        range.start().to_string()
                    } else {
                        format!("{} to {}", range.start(), range.end())
                    },
                    args.len()
                ),
            )
        }
    }

    /// Evaluates `body` per item of `input`; `make` builds the SELECT from the alias.
    fn item_scope(&mut self, alias: &str, scope: &Scope) -> Scope {
        Scope {
            this: format!("{alias}.v"),
            index: format!("({alias}.i - 1)::integer"),
            row_index: scope.row_index.clone(),
        }
    }

    fn call(
        &mut self,
        on: Option<&Expr>,
        name: &str,
        args: &[Expr],
        scope: &Scope,
        at: &str,
    ) -> Result<V, CompileError> {
        if !FUNCTIONS.contains(&name) {
            let hint = FUNCTIONS
                .iter()
                .map(|f| (strsim::levenshtein(f, name), f))
                .min()
                .filter(|(d, _)| *d <= 2)
                .map(|(_, f)| format!(" (did you mean {f}()?)"))
                .unwrap_or_default();
            let message = if name == "resolve" {
                "resolve() is not supported: a view row depends on its own resource only"
                    .to_string()
            } else {
                format!("unknown function {name:?}{hint}")
            };
            return self.err(at, message);
        }
        // ofType on a member selects the choice element (`value.ofType(Quantity)` is
        // `valueQuantity`); elsewhere it filters by the items' JSON or resource type.
        if matches!(name, "ofType" | "as") {
            let t = self.type_arg(args, at, name)?;
            if let Some(Expr::Member(base, member)) = on
                && !crate::fhir::is_resource_type(&t)
            {
                let renamed = Expr::Member(base.clone(), format!("{member}{}", capitalise(&t)));
                let mut v = self.expr(&renamed, scope, at)?;
                if let Some(ty) = primitive_ty(&t) {
                    v.ty = ty;
                }
                return Ok(v);
            }
            let input = match on {
                Some(on) => self.expr(on, scope, at)?,
                None => V::new(Repr::Scalar(scope.this.clone()), Ty::Any),
            };
            let (root, path) = input.path();
            let filter = match t.as_str() {
                "string" | "code" | "id" | "uri" | "url" | "canonical" | "markdown" | "date"
                | "dateTime" | "time" | "instant" => "@.type() == \"string\"".to_string(),
                "boolean" => "@.type() == \"boolean\"".into(),
                "integer" | "positiveInt" | "unsignedInt" => {
                    "@.type() == \"number\" && @ == @.floor()".into()
                }
                "decimal" => "@.type() == \"number\"".into(),
                other if crate::fhir::is_resource_type(other) => {
                    format!("@.\"resourceType\" == {}", jp_string(other))
                }
                _ => "@.type() == \"object\"".into(),
            };
            return Ok(V::new(
                Repr::Path {
                    root,
                    path: format!("{path} ? ({filter})"),
                },
                primitive_ty(&t).unwrap_or(Ty::Any),
            ));
        }
        let input = match on {
            Some(on) => self.expr(on, scope, at)?,
            None => V::new(Repr::Scalar(scope.this.clone()), Ty::Any),
        };
        let boolean = |sql: String| V::new(Repr::Bool(sql), Ty::Boolean);
        let scalar = |sql: String, ty: Ty| V::new(Repr::Scalar(sql), ty);
        let coll = |sql: String, ty: Ty| V::new(Repr::Coll(sql), ty);
        Ok(match name {
            "where" | "exists" | "all" | "select" if args.len() == 1 => {
                let e = self.alias("e");
                let item = self.item_scope(&e, scope);
                let arg = self.expr(&args[0], &item, at)?;
                let elements = format!(
                    "jsonb_array_elements({}) WITH ORDINALITY AS {e}(v, i)",
                    input.coll()
                );
                match name {
                    "where" | "exists" => {
                        let filtered = format!(
                            "(SELECT jsonb_agg({e}.v ORDER BY {e}.i) FROM {elements} WHERE {})",
                            arg.boolean()
                        );
                        if name == "exists" {
                            boolean(format!(
                                "EXISTS (SELECT 1 FROM {elements} WHERE {})",
                                arg.boolean()
                            ))
                        } else {
                            coll(filtered, input.ty)
                        }
                    }
                    "all" => boolean(format!(
                        "NOT EXISTS (SELECT 1 FROM {elements} WHERE NOT coalesce({}, false))",
                        arg.boolean()
                    )),
                    _ => {
                        let x = self.alias("x");
                        coll(
                            format!(
                                "(SELECT jsonb_agg({x}.v ORDER BY {e}.i, {x}.j) FROM {elements} CROSS JOIN LATERAL jsonb_array_elements({}) WITH ORDINALITY AS {x}(v, j))",
                                arg.coll()
                            ),
                            arg.ty,
                        )
                    }
                }
            }
            "where" | "select" | "all" => {
                return self.err(at, format!("{name}() takes one argument"));
            }
            "exists" | "hasValue" => {
                self.arity(args, 0..=0, name, at)?;
                boolean(input.exists())
            }
            "empty" => {
                self.arity(args, 0..=0, name, at)?;
                boolean(format!("(NOT {})", input.exists()))
            }
            "first" | "single" => {
                self.arity(args, 0..=0, name, at)?;
                scalar(input.scalar(), input.ty)
            }
            "last" => {
                self.arity(args, 0..=0, name, at)?;
                scalar(format!("({} -> -1)", input.coll()), input.ty)
            }
            "tail" | "skip" | "take" => {
                let n = if name == "tail" {
                    self.arity(args, 0..=0, name, at)?;
                    "1".to_string()
                } else {
                    self.arity(args, 1..=1, name, at)?;
                    let n = self.expr(&args[0], scope, at)?;
                    format!("({})::integer", n.text())
                };
                let e = self.alias("e");
                let condition = if name == "take" {
                    format!("{e}.i <= {n}")
                } else {
                    format!("{e}.i > {n}")
                };
                coll(
                    format!(
                        "(SELECT jsonb_agg({e}.v ORDER BY {e}.i) FROM jsonb_array_elements({}) WITH ORDINALITY AS {e}(v, i) WHERE {condition})",
                        input.coll()
                    ),
                    input.ty,
                )
            }
            "count" => {
                self.arity(args, 0..=0, name, at)?;
                scalar(
                    format!(
                        "to_jsonb(coalesce(jsonb_array_length({}), 0))",
                        input.coll()
                    ),
                    Ty::Integer,
                )
            }
            "not" => {
                self.arity(args, 0..=0, name, at)?;
                boolean(format!("(NOT {})", input.boolean()))
            }
            "distinct" | "isDistinct" => {
                self.arity(args, 0..=0, name, at)?;
                let e = self.alias("e");
                let c = input.coll();
                let distinct = format!(
                    "(SELECT jsonb_agg(DISTINCT {e}.v) FROM jsonb_array_elements({c}) AS {e}(v))"
                );
                if name == "distinct" {
                    coll(distinct, input.ty)
                } else {
                    boolean(format!(
                        "(coalesce(jsonb_array_length({distinct}), 0) = coalesce(jsonb_array_length({c}), 0))"
                    ))
                }
            }
            "allTrue" | "anyTrue" | "allFalse" | "anyFalse" => {
                self.arity(args, 0..=0, name, at)?;
                let c = format!("coalesce({}, '[]'::jsonb)", input.coll());
                boolean(match name {
                    "allTrue" => format!("(NOT {c} @> '[false]')"),
                    "anyTrue" => format!("({c} @> '[true]')"),
                    "allFalse" => format!("(NOT {c} @> '[true]')"),
                    _ => format!("({c} @> '[false]')"),
                })
            }
            "iif" => {
                self.arity(args, 2..=3, name, at)?;
                let condition = self.expr(&args[0], scope, at)?;
                let then = self.expr(&args[1], scope, at)?;
                let otherwise = match args.get(2) {
                    Some(e) => self.expr(e, scope, at)?.coll(),
                    None => "NULL::jsonb".into(),
                };
                coll(
                    format!(
                        "(CASE WHEN {} THEN {} ELSE {otherwise} END)",
                        condition.boolean(),
                        then.coll()
                    ),
                    then.ty,
                )
            }
            "combine" | "union" | "intersect" | "exclude" | "subsetOf" | "supersetOf" => {
                self.arity(args, 1..=1, name, at)?;
                let other = self.expr(&args[0], scope, at)?;
                let (a, b) = (
                    format!("coalesce({}, '[]'::jsonb)", input.coll()),
                    format!("coalesce({}, '[]'::jsonb)", other.coll()),
                );
                let e = self.alias("e");
                match name {
                    "combine" => coll(format!("({a} || {b})"), input.ty),
                    "union" => coll(
                        format!(
                            "(SELECT jsonb_agg(DISTINCT {e}.v) FROM jsonb_array_elements({a} || {b}) AS {e}(v))"
                        ),
                        input.ty,
                    ),
                    "intersect" => coll(
                        format!(
                            "(SELECT jsonb_agg(DISTINCT {e}.v) FROM jsonb_array_elements({a}) AS {e}(v) WHERE {b} @> jsonb_build_array({e}.v))"
                        ),
                        input.ty,
                    ),
                    "exclude" => coll(
                        format!(
                            "(SELECT jsonb_agg({e}.v ORDER BY {e}.i) FROM jsonb_array_elements({a}) WITH ORDINALITY AS {e}(v, i) WHERE NOT {b} @> jsonb_build_array({e}.v))"
                        ),
                        input.ty,
                    ),
                    "subsetOf" => boolean(format!("({b} @> {a})")),
                    _ => boolean(format!("({a} @> {b})")),
                }
            }
            "join" => {
                self.arity(args, 0..=1, name, at)?;
                let separator = match args.first() {
                    Some(e) => self.expr(e, scope, at)?.text(),
                    None => "''".into(),
                };
                let e = self.alias("e");
                scalar(
                    format!(
                        "(SELECT to_jsonb(string_agg({e}.v #>> '{{}}', {separator} ORDER BY {e}.i)) FROM jsonb_array_elements({}) WITH ORDINALITY AS {e}(v, i))",
                        input.coll()
                    ),
                    Ty::String,
                )
            }
            "extension" => {
                self.arity(args, 1..=1, name, at)?;
                let url = self.static_string(&args[0], at, name)?;
                let (root, path) = input.path();
                V::new(
                    Repr::Path {
                        root,
                        path: format!(
                            "{path}.\"extension\"[*] ? (@.\"url\" == {})",
                            jp_string(&url)
                        ),
                    },
                    Ty::Any,
                )
            }
            "getResourceKey" => {
                self.arity(args, 0..=0, name, at)?;
                scalar(format!("({} -> 'id')", input.scalar()), Ty::String)
            }
            "getReferenceKey" => {
                self.arity(args, 0..=1, name, at)?;
                let t = if args.is_empty() {
                    "NULL::text".to_string()
                } else {
                    lit(&self.type_arg(args, at, name)?)
                };
                coll(
                    format!("fhir_sync.sof_reference_keys({}, {t})", input.coll()),
                    Ty::String,
                )
            }
            "lowBoundary" | "highBoundary" => {
                self.arity(args, 0..=1, name, at)?;
                let kind = match input.ty {
                    Ty::Date => "date",
                    Ty::DateTime => "dateTime",
                    Ty::Time => "time",
                    Ty::Decimal | Ty::Integer => "decimal",
                    _ => "any",
                };
                coll(
                    format!(
                        "fhir_sync.sof_boundary({}, {}, {})",
                        input.coll(),
                        lit(kind),
                        name == "highBoundary"
                    ),
                    input.ty,
                )
            }
            "toString" => {
                self.arity(args, 0..=0, name, at)?;
                scalar(format!("to_jsonb({})", input.text()), Ty::String)
            }
            "toInteger" | "convertsToInteger" => {
                self.arity(args, 0..=0, name, at)?;
                let s = input.scalar();
                let ok = format!(
                    "(jsonb_typeof({s}) = 'number' AND ({s})::numeric = trunc(({s})::numeric) OR ({s} #>> '{{}}') ~ '^[+-]?[0-9]{{1,9}}$')"
                );
                if name == "toInteger" {
                    scalar(
                        format!(
                            "(CASE WHEN {ok} THEN to_jsonb(({s} #>> '{{}}')::numeric::integer) END)"
                        ),
                        Ty::Integer,
                    )
                } else {
                    boolean(format!(
                        "(CASE WHEN {s} IS NOT NULL THEN coalesce({ok}, false) END)"
                    ))
                }
            }
            "toDecimal" | "convertsToDecimal" => {
                self.arity(args, 0..=0, name, at)?;
                let s = input.scalar();
                let ok = format!(
                    "(jsonb_typeof({s}) = 'number' OR ({s} #>> '{{}}') ~ '^[+-]?[0-9]+(\\.[0-9]+)?$')"
                );
                if name == "toDecimal" {
                    scalar(
                        format!("(CASE WHEN {ok} THEN to_jsonb(({s} #>> '{{}}')::numeric) END)"),
                        Ty::Decimal,
                    )
                } else {
                    boolean(format!(
                        "(CASE WHEN {s} IS NOT NULL THEN coalesce({ok}, false) END)"
                    ))
                }
            }
            "toBoolean" | "convertsToBoolean" => {
                self.arity(args, 0..=0, name, at)?;
                let t = format!("lower({})", input.text());
                let value = format!(
                    "(CASE WHEN {t} IN ('true', 't', 'yes', 'y', '1', '1.0') THEN true WHEN {t} IN ('false', 'f', 'no', 'n', '0', '0.0') THEN false END)"
                );
                if name == "toBoolean" {
                    boolean(value)
                } else {
                    boolean(format!(
                        "(CASE WHEN {t} IS NOT NULL THEN {value} IS NOT NULL END)"
                    ))
                }
            }
            "length" => {
                self.arity(args, 0..=0, name, at)?;
                scalar(format!("to_jsonb(length({}))", input.text()), Ty::Integer)
            }
            "upper" | "lower" | "trim" => {
                self.arity(args, 0..=0, name, at)?;
                let f = if name == "trim" { "btrim" } else { name };
                scalar(format!("to_jsonb({f}({}))", input.text()), Ty::String)
            }
            "startsWith" | "endsWith" | "contains" | "matches" | "indexOf" | "split" => {
                self.arity(args, 1..=1, name, at)?;
                let t = input.text();
                let a = self.expr(&args[0], scope, at)?.text();
                match name {
                    "startsWith" => boolean(format!("starts_with({t}, {a})")),
                    "endsWith" => boolean(format!("(right({t}, length({a})) = {a})")),
                    "contains" => boolean(format!("(strpos({t}, {a}) > 0)")),
                    "matches" => boolean(format!("({t} ~ {a})")),
                    "indexOf" => scalar(format!("to_jsonb(strpos({t}, {a}) - 1)"), Ty::Integer),
                    _ => coll(format!("to_jsonb(string_to_array({t}, {a}))"), Ty::String),
                }
            }
            "replace" | "replaceMatches" => {
                self.arity(args, 2..=2, name, at)?;
                let t = input.text();
                let a = self.expr(&args[0], scope, at)?.text();
                let b = self.expr(&args[1], scope, at)?.text();
                let sql = if name == "replace" {
                    format!("to_jsonb(replace({t}, {a}, {b}))")
                } else {
                    format!("to_jsonb(regexp_replace({t}, {a}, {b}, 'g'))")
                };
                scalar(sql, Ty::String)
            }
            "substring" => {
                self.arity(args, 1..=2, name, at)?;
                let t = input.text();
                let start = self.expr(&args[0], scope, at)?.num();
                let sql = match args.get(1) {
                    Some(len) => {
                        let len = self.expr(len, scope, at)?.num();
                        format!(
                            "to_jsonb(nullif(substr({t}, ({start})::integer + 1, ({len})::integer), ''))"
                        )
                    }
                    None => format!("to_jsonb(nullif(substr({t}, ({start})::integer + 1), ''))"),
                };
                scalar(sql, Ty::String)
            }
            "abs" | "ceiling" | "floor" | "truncate" => {
                self.arity(args, 0..=0, name, at)?;
                let f = match name {
                    "ceiling" => "ceil",
                    "truncate" => "trunc",
                    other => other,
                };
                scalar(format!("to_jsonb({f}({}))", input.num()), input.ty)
            }
            "round" => {
                self.arity(args, 0..=1, name, at)?;
                let digits = match args.first() {
                    Some(d) => format!("({})::integer", self.expr(d, scope, at)?.text()),
                    None => "0".into(),
                };
                scalar(
                    format!("to_jsonb(round({}, {digits}))", input.num()),
                    Ty::Decimal,
                )
            }
            other => return self.err(at, format!("unknown function {other:?}")),
        })
    }
}

/// The first item `first` (jsonb) as a value of `sql_type`.
fn convert(first: &str, sql_type: &str) -> String {
    match sql_type {
        "jsonb" => first.to_string(),
        "text" => format!("({first} #>> '{{}}')"),
        // Through numeric, so that an integral decimal (`6.0`, from arithmetic) still converts.
        "integer" | "bigint" => format!("({first} #>> '{{}}')::numeric::{sql_type}"),
        other => format!("({first} #>> '{{}}')::{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::definition::from_json;

    fn compiled(json: &str) -> Result<CompiledView, CompileError> {
        compile(&from_json(json).unwrap())
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(lit("o'brien"), "'o''brien'");
        let v = compiled(
            r#"{"resource":"Patient","select":[{"column":[{"name":"n","path":"name.where(family = 'O\\'Brien\" --').given"}]}]}"#,
        );
        // A quote in a FHIRPath string never ends the SQL literal it sits in.
        let sql = v.unwrap().query();
        assert!(sql.contains("'\"O''Brien\\\" --\"'::jsonb"), "{sql}");
    }

    #[test]
    fn columns_get_the_spec_types_and_keys_come_first() {
        let v = compiled(
            r#"{"resource":"Patient","select":[{"column":[
                {"name":"id","path":"id","type":"id"},
                {"name":"active","path":"active","type":"boolean"},
                {"name":"n","path":"multipleBirth.ofType(integer)","type":"integer"},
                {"name":"given","path":"name.given","collection":true},
                {"name":"born","path":"birthDate","type":"date","tag":[{"name":"ansi/type","value":"DATE"}]},
                {"name":"any","path":"name"}]}]}"#,
        )
        .unwrap();
        let types: Vec<(&str, &str)> = v
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.sql_type.as_str()))
            .collect();
        assert_eq!(
            types,
            [
                ("id", "text"),
                ("active", "boolean"),
                ("n", "integer"),
                ("given", "jsonb"),
                ("born", "date"),
                ("any", "jsonb")
            ]
        );
        let sql = v.query();
        assert!(
            sql.starts_with("SELECT r.source AS \"_source\", r.id AS \"_resource_id\", v.\"id\""),
            "{sql}"
        );
        assert!(
            sql.contains("r.resource_type = 'Patient' AND r.deleted_at IS NULL"),
            "{sql}"
        );
        assert!(
            sql.contains("\"multipleBirthInteger\""),
            "ofType picks the choice element: {sql}"
        );
    }

    #[test]
    fn bad_paths_name_the_element() {
        let cases = [
            (
                r#"{"resource":"Patient","select":[{"column":[{"name":"a","path":"id"}]},{"column":[{"name":"b","path":"name.frist()"}]}]}"#,
                "select[1].column[0].path: unknown function \"frist\" (did you mean first()?)",
            ),
            (
                r#"{"resource":"Patient","select":[{"forEach":"name.where(use = %nope)","column":[{"name":"a","path":"family"}]}]}"#,
                "select[0].forEach: constant %nope is not defined",
            ),
            (
                r#"{"resource":"Patient","select":[{"forEach":"@@"}]}"#,
                "select[0].forEach: FHIRPath does not parse",
            ),
            (
                r#"{"resource":"Patient","select":[{"column":[{"name":"a","path":"id"}]}],"where":[{"path":"name.count() + 1"}]}"#,
                "where[0].path: a where path must be boolean",
            ),
            (
                r#"{"resource":"Patient","select":[{"column":[{"name":"a","path":"link.other.resolve()"}]}]}"#,
                "select[0].column[0].path: resolve() is not supported",
            ),
            (
                r#"{"resource":"Patient","select":[{"column":[{"name":"a","path":"id","tag":[{"name":"ansi/type","value":"text; drop table x"}]}]}]}"#,
                "select[0].column[0].tag: ",
            ),
        ];
        for (json, expected) in cases {
            let got = compiled(json).map(|_| ()).unwrap_err().to_string();
            assert!(
                got.starts_with(expected),
                "{json}\nexpected {expected}\ngot {got}"
            );
        }
    }

    #[test]
    fn sql_type_names_allow_sizes_and_words_only() {
        for ok in [
            "DATE",
            "VARCHAR(64)",
            "NUMERIC(10, 2)",
            "TIMESTAMP WITH TIME ZONE",
        ] {
            assert!(is_type_name(ok), "{ok}");
        }
        for bad in ["", "text;", "int) --", "NUMERIC(a)", "\"x\"", "1int"] {
            assert!(!is_type_name(bad), "{bad}");
        }
    }
}
