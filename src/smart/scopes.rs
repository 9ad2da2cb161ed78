//! SMART scopes for backend services: building the request in v1 (`system/Patient.read`) or v2
//! (`system/Patient.rs`) syntax, and checking what the server actually granted.
//!
//! Pure functions without IO. The server may grant less than asked; the caller decides (per the
//! job's `on_missing_scope`) whether that drops types or fails the run, never silently.

use crate::config::ScopeStyle;

/// The scope syntax to use: the job's choice, or (for `auto`) v2 only when the server
/// advertises `permission-v2` without `permission-v1`, since v1 is what most EHRs accept.
pub fn choose_style(configured: ScopeStyle, capabilities: &[String]) -> ScopeStyle {
    match configured {
        ScopeStyle::Auto => {
            let has = |c: &str| capabilities.iter().any(|x| x == c);
            if has("permission-v2") && !has("permission-v1") {
                ScopeStyle::V2
            } else {
                ScopeStyle::V1
            }
        }
        fixed => fixed,
    }
}

/// One read scope per exported type in `style` (`auto` is treated as v1).
pub fn read_scopes(types: &[String], style: ScopeStyle) -> Vec<String> {
    let suffix = match style {
        ScopeStyle::V2 => "rs",
        ScopeStyle::V1 | ScopeStyle::Auto => "read",
    };
    types
        .iter()
        .map(|t| format!("system/{t}.{suffix}"))
        .collect()
}

/// Whether one scope lets its holder read (search) `resource_type` at system level:
/// `.read`, `.*`, or a v2 permission string containing `r`; `*` covers every type. Granular
/// v2 scopes (`?category=…`) are a filtered subset, so they do not count as covering a type.
pub fn covers(scope: &str, resource_type: &str) -> bool {
    let Some((scope_type, permissions)) = scope
        .strip_prefix("system/")
        .and_then(|rest| rest.split_once('.'))
    else {
        return false;
    };
    if scope_type != "*" && scope_type != resource_type {
        return false;
    }
    match permissions {
        "read" | "*" => true,
        p => {
            !p.is_empty()
                && p.chars().all(|c| "cruds".contains(c))
                && p.contains('r')
                && p.contains('s')
        }
    }
}

/// The exported types that no granted scope covers, in export order.
pub fn uncovered_types(granted: &str, types: &[String]) -> Vec<String> {
    let granted: Vec<&str> = granted.split_whitespace().collect();
    types
        .iter()
        .filter(|t| !granted.iter().any(|s| covers(s, t)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn style_follows_capabilities() {
        let cases: [(&[&str], ScopeStyle); 4] = [
            (&["permission-v2"], ScopeStyle::V2),
            (&["permission-v1", "permission-v2"], ScopeStyle::V1),
            (&["permission-v1"], ScopeStyle::V1),
            (&[], ScopeStyle::V1),
        ];
        for (capabilities, expected) in cases {
            assert_eq!(
                choose_style(ScopeStyle::Auto, &strings(capabilities)),
                expected,
                "{capabilities:?}"
            );
        }
        assert_eq!(
            choose_style(ScopeStyle::V2, &strings(&["permission-v1"])),
            ScopeStyle::V2
        );
        assert_eq!(
            choose_style(ScopeStyle::V1, &strings(&["permission-v2"])),
            ScopeStyle::V1
        );
    }

    #[test]
    fn read_scopes_in_both_styles() {
        let types = strings(&["Patient", "Observation"]);
        assert_eq!(
            read_scopes(&types, ScopeStyle::V1),
            ["system/Patient.read", "system/Observation.read"]
        );
        assert_eq!(
            read_scopes(&types, ScopeStyle::V2),
            ["system/Patient.rs", "system/Observation.rs"]
        );
    }

    #[test]
    fn coverage_normalises_v1_and_v2() {
        let cases = [
            ("system/Patient.read", "Patient", true),
            ("system/Patient.rs", "Patient", true),
            ("system/Patient.cruds", "Patient", true),
            ("system/*.read", "Observation", true),
            ("system/*.*", "Observation", true),
            ("system/*.rs", "Observation", true),
            ("system/Patient.read", "Observation", false),
            ("system/Observation.r", "Observation", false),
            ("system/Observation.write", "Observation", false),
            ("patient/*.read", "Observation", false),
            (
                "system/Observation.rs?category=laboratory",
                "Observation",
                false,
            ),
            ("launch", "Patient", false),
        ];
        for (scope, resource_type, expected) in cases {
            assert_eq!(
                covers(scope, resource_type),
                expected,
                "{scope} {resource_type}"
            );
        }
        assert_eq!(
            uncovered_types(
                "system/Patient.read launch",
                &strings(&["Patient", "Observation", "Condition"])
            ),
            ["Observation", "Condition"]
        );
        assert!(uncovered_types("system/*.rs", &strings(&["Patient"])).is_empty());
        assert_eq!(uncovered_types("", &strings(&["Patient"])), ["Patient"]);
    }
}
