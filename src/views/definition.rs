//! The SQL-on-FHIR v2 ViewDefinition as data: the serde model and its structural validation.
//!
//! A file is read with `serde_path_to_error`, so a wrong shape names its element
//! (`select[0].forEach: invalid type`); then [`ViewDefinition::check`] applies the rules the
//! JSON shape cannot say (sql names, unique columns, matching `unionAll` branches, one iteration
//! per select, typed constants, a known resource type). What the paths mean is checked by the
//! compiler, which [`super::compile`] runs as part of validation.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One ViewDefinition.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ViewDefinition {
    #[serde(default)]
    pub resource_type: Option<String>,
    /// Names the table; required for views that are materialised, optional in test files.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    /// The FHIR resource type the view reads.
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub constant: Vec<Constant>,
    #[serde(default)]
    pub select: Vec<Select>,
    #[serde(default, rename = "where")]
    pub where_: Vec<Where>,
}

/// `constant`: a name and exactly one `value[x]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Constant {
    pub name: String,
    /// Every other element: the `value[x]` is found here by [`Constant::value`].
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

/// The FHIR primitive types a constant's `value[x]` may have.
pub const CONSTANT_TYPES: &[&str] = &[
    "Base64Binary",
    "Boolean",
    "Canonical",
    "Code",
    "Date",
    "DateTime",
    "Decimal",
    "Id",
    "Instant",
    "Integer",
    "Integer64",
    "Oid",
    "PositiveInt",
    "String",
    "Time",
    "UnsignedInt",
    "Uri",
    "Url",
    "Uuid",
];

impl Constant {
    /// The constant's value and its type (`String`, `Integer`, ...), or why there is none.
    pub fn value(&self) -> Result<(&'static str, &serde_json::Value), String> {
        let mut found = None;
        for (key, value) in &self.rest {
            let Some(ty) = key.strip_prefix("value") else {
                continue;
            };
            let Some(known) = CONSTANT_TYPES.iter().find(|t| **t == ty) else {
                return Err(format!("{key:?} is not a value type a constant may have"));
            };
            if found.is_some() {
                return Err("a constant has exactly one value[x]".into());
            }
            let valid = match *known {
                "Boolean" => value.is_boolean(),
                "Integer" | "PositiveInt" | "UnsignedInt" | "Integer64" => {
                    value.is_i64() || (*known == "Integer64" && value.is_string())
                }
                "Decimal" => value.is_number(),
                _ => value.is_string(),
            };
            if !valid {
                return Err(format!("{key} has the wrong JSON type"));
            }
            found = Some((*known, value));
        }
        found.ok_or_else(|| "a constant needs a value[x] (valueString, valueInteger, ...)".into())
    }
}

/// `select`: columns, nested selects and `unionAll` branches, optionally iterated.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Select {
    #[serde(default)]
    pub column: Vec<Column>,
    #[serde(default)]
    pub select: Vec<Select>,
    #[serde(default)]
    pub for_each: Option<String>,
    #[serde(default)]
    pub for_each_or_null: Option<String>,
    #[serde(default)]
    pub repeat: Option<Vec<String>>,
    #[serde(default)]
    pub union_all: Vec<Select>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Column {
    pub path: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub collection: Option<bool>,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub tag: Vec<Tag>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Tag {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Where {
    pub path: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// A problem with a view, at an element path (`select[1].column[0].path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Parses a ViewDefinition from JSON, naming the element of a shape error.
pub fn from_json(text: &str) -> Result<ViewDefinition, Problem> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        Problem {
            path: if path == "." { String::new() } else { path },
            message,
        }
    })
}

/// Parses a ViewDefinition from an already-read JSON value.
pub fn from_value(value: &serde_json::Value) -> Result<ViewDefinition, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| Problem {
        path: if e.path().to_string() == "." {
            String::new()
        } else {
            e.path().to_string()
        },
        message: e.inner().to_string(),
    })
}

/// Whether `name` is a sql-name as the spec defines it (`^[A-Za-z][A-Za-z0-9_]*$`).
pub fn is_sql_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

impl ViewDefinition {
    /// The structural rules; every problem is collected. `need_name` for materialised views.
    pub fn check(&self, need_name: bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut push = |path: &str, message: String| {
            problems.push(Problem {
                path: path.to_string(),
                message,
            })
        };
        match &self.resource {
            None => push("resource", "a view needs a resource type".into()),
            Some(r) if !crate::fhir::is_resource_type(r) => {
                let hint = crate::fhir::closest_resource_type(r)
                    .map(|c| format!(" (did you mean {c:?}?)"))
                    .unwrap_or_default();
                push(
                    "resource",
                    format!("{r:?} is not a FHIR resource type{hint}"),
                )
            }
            Some(_) => {}
        }
        match &self.name {
            None if need_name => push("name", "a view needs a name (it names the table)".into()),
            // 48, not 63: the shadow table a rebuild creates adds a suffix to the name.
            Some(n) if !is_sql_name(n) || n.len() > 48 => push(
                "name",
                format!(
                    "{n:?} is not a sql name (a letter, then letters, digits or _, at most 48)"
                ),
            ),
            _ => {}
        }
        if self.select.is_empty() {
            push("select", "a view needs at least one select".into());
        }
        let mut constants = std::collections::HashSet::new();
        for (i, c) in self.constant.iter().enumerate() {
            if !is_sql_name(&c.name) {
                push(
                    &format!("constant[{i}].name"),
                    format!("{:?} is not a sql name", c.name),
                );
            }
            if !constants.insert(c.name.as_str()) {
                push(
                    &format!("constant[{i}].name"),
                    format!("constant {:?} is defined twice", c.name),
                );
            }
            if let Err(e) = c.value() {
                push(&format!("constant[{i}]"), e);
            }
        }
        let mut names = BTreeMap::new();
        for (i, s) in self.select.iter().enumerate() {
            check_select(s, &format!("select[{i}]"), &mut names, &mut problems);
        }
        problems
    }
}

/// The output column names of a select, in order (column, then select, then unionAll).
pub fn column_names(select: &Select) -> Vec<&str> {
    let mut names: Vec<&str> = select.column.iter().map(|c| c.name.as_str()).collect();
    for s in &select.select {
        names.extend(column_names(s));
    }
    if let Some(first) = select.union_all.first() {
        names.extend(column_names(first));
    }
    names
}

fn check_select(
    select: &Select,
    path: &str,
    names: &mut BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) {
    let iterations = [
        select.for_each.is_some(),
        select.for_each_or_null.is_some(),
        select.repeat.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if iterations > 1 {
        problems.push(Problem {
            path: path.to_string(),
            message: "a select has at most one of forEach, forEachOrNull and repeat".into(),
        });
    }
    if select.repeat.as_ref().is_some_and(Vec::is_empty) {
        problems.push(Problem {
            path: format!("{path}.repeat"),
            message: "repeat needs at least one path".into(),
        });
    }
    for (i, c) in select.column.iter().enumerate() {
        let at = format!("{path}.column[{i}]");
        if !is_sql_name(&c.name) {
            problems.push(Problem {
                path: format!("{at}.name"),
                message: format!("{:?} is not a sql name", c.name),
            });
        }
        if let Some(first) = names.insert(c.name.clone(), at.clone()) {
            problems.push(Problem {
                path: format!("{at}.name"),
                message: format!("column {:?} is already defined at {first}", c.name),
            });
        }
    }
    for (i, s) in select.select.iter().enumerate() {
        check_select(s, &format!("{path}.select[{i}]"), names, problems);
    }
    if let Some(first) = select.union_all.first() {
        let expected = column_names(first);
        // Every branch defines the same names: check the first against the view's names,
        // the others against the first only.
        let mut branch_names = names.clone();
        check_select(
            first,
            &format!("{path}.unionAll[0]"),
            &mut branch_names,
            problems,
        );
        for (i, branch) in select.union_all.iter().enumerate().skip(1) {
            let mut own = names.clone();
            check_select(branch, &format!("{path}.unionAll[{i}]"), &mut own, problems);
            let got = column_names(branch);
            if got != expected {
                problems.push(Problem {
                    path: format!("{path}.unionAll[{i}]"),
                    message: format!(
                        "unionAll branches must have the same columns in the same order: {:?} here, {:?} in unionAll[0]",
                        got, expected
                    ),
                });
            }
        }
        *names = branch_names;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(json: &str) -> Vec<String> {
        match from_json(json) {
            Ok(v) => v.check(true).iter().map(ToString::to_string).collect(),
            Err(p) => vec![p.to_string()],
        }
    }

    #[test]
    fn a_valid_view_has_no_problems() {
        let json = r#"{"name":"patient","resource":"Patient","constant":[{"name":"u","valueString":"official"}],
            "select":[{"column":[{"name":"id","path":"id"}]},
                      {"unionAll":[{"column":[{"name":"a","path":"id"}]},{"forEach":"name","column":[{"name":"a","path":"family"}]}]}]}"#;
        assert!(problems(json).is_empty(), "{:?}", problems(json));
    }

    #[test]
    fn each_rule_names_its_element() {
        let cases = [
            (
                r#"{"name":"v","select":[{"column":[{"name":"id","path":"id"}]}]}"#,
                "resource: a view needs a resource type",
            ),
            (
                r#"{"name":"v","resource":"Patinet","select":[{"column":[{"name":"id","path":"id"}]}]}"#,
                "resource: \"Patinet\" is not a FHIR resource type (did you mean \"Patient\"?)",
            ),
            (
                r#"{"name":"1v","resource":"Patient","select":[{"column":[{"name":"id","path":"id"}]}]}"#,
                "name: \"1v\" is not a sql name",
            ),
            (
                r#"{"name":"v","resource":"Patient","select":[{"column":[{"name":"id","path":"id"},{"name":"id","path":"id"}]}]}"#,
                "select[0].column[1].name: column \"id\" is already defined at select[0].column[0]",
            ),
            (
                r#"{"name":"v","resource":"Patient","select":[{"forEach":"a","repeat":["b"]}]}"#,
                "select[0]: a select has at most one of forEach",
            ),
            (
                r#"{"name":"v","resource":"Patient","constant":[{"name":"c"}],"select":[{"column":[{"name":"id","path":"id"}]}]}"#,
                "constant[0]: a constant needs a value[x]",
            ),
            (
                r#"{"name":"v","resource":"Patient","constant":[{"name":"c","valueInteger":"x"}],"select":[{"column":[{"name":"id","path":"id"}]}]}"#,
                "constant[0]: valueInteger has the wrong JSON type",
            ),
            (
                r#"{"name":"v","resource":"Patient","select":[{"unionAll":[{"column":[{"name":"a","path":"id"}]},{"column":[{"name":"b","path":"id"}]}]}]}"#,
                "select[0].unionAll[1]: unionAll branches must have the same columns",
            ),
            (
                r#"{"name":"v","resource":"Patient","select":[{"forEach":1}]}"#,
                "select[0].forEach: invalid type",
            ),
        ];
        for (json, expected) in cases {
            let got = problems(json);
            assert!(
                got.iter().any(|p| p.starts_with(expected)),
                "{json}: expected {expected:?}, got {got:?}"
            );
        }
    }
}
