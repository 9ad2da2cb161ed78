//! Deterministic synthetic FHIR R4 data for the fake server: a `Dataset` is only a seed and a
//! patient count, and every resource is computed on demand from `(seed, type, index)`.
//!
//! It must stay random-access and cheap, with no global state and no caches, so that the fake
//! server can stream export files of any size without ever holding the data set in memory, and
//! so that tests can recompute any line they expect to have been loaded. It must not depend on
//! anything that varies between runs (clocks, `HashMap` iteration order, std's hasher).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use time::format_description::FormatItem;
use time::macros::format_description;
use time::{Date, Duration, OffsetDateTime, UtcOffset};

/// The resource types the fake server holds data for, in the order it exports them by default.
pub const RESOURCE_TYPES: [&str; 4] = ["Patient", "Encounter", "Observation", "Condition"];

/// How many resources of each type belong to one patient.
const ENCOUNTERS_PER_PATIENT: usize = 3;
const OBSERVATIONS_PER_PATIENT: usize = 12;
const CONDITIONS_PER_PATIENT: usize = 2;

/// `meta.lastUpdated` falls in [2024-01-01T00:00:00Z, 2026-01-01T00:00:00Z).
const LAST_UPDATED_START_MS: i64 = 1_704_067_200_000;
const LAST_UPDATED_END_MS: i64 = 1_767_225_600_000;

const INSTANT_MS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
const DATE_TIME_OFFSET: &[FormatItem<'static>] = format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second][offset_hour sign:mandatory]:[offset_minute]"
);
const DATE: &[FormatItem<'static>] = format_description!("[year]-[month]-[day]");

/// A synthetic population: `patients` patients and their encounters, observations and
/// conditions, all derived from `seed`.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub seed: u64,
    pub patients: usize,
    /// 0 for the data set itself; `n` for its "changed" generation (see [`Dataset::changed`]):
    /// every `n`-th resource of each type, in a newer version.
    pub changed_every: usize,
}

impl Dataset {
    pub fn new(seed: u64, patients: usize) -> Self {
        Dataset {
            seed,
            patients,
            changed_every: 0,
        }
    }

    /// The resources that changed since this data set, as a data set of their own: every
    /// `every`-th resource of each type (index 0, `every`, `2·every`, ...; the same ids), each with
    /// `meta.lastUpdated` after every original one and `meta.versionId` one higher. Serving it
    /// after the original stands for an incremental export where 1/`every` of the data changed.
    pub fn changed(&self, every: usize) -> Dataset {
        Dataset {
            changed_every: every.max(1),
            ..self.clone()
        }
    }

    /// The index in the original data set of the `index`-th resource of this one.
    fn base_index(&self, index: usize) -> usize {
        if self.changed_every == 0 {
            index
        } else {
            index * self.changed_every
        }
    }

    /// How many resources of `resource_type` exist; 0 for any type outside [`RESOURCE_TYPES`].
    pub fn count(&self, resource_type: &str) -> usize {
        let all = match resource_type {
            "Patient" => self.patients,
            "Encounter" => self.patients * ENCOUNTERS_PER_PATIENT,
            "Observation" => self.patients * OBSERVATIONS_PER_PATIENT,
            "Condition" => self.patients * CONDITIONS_PER_PATIENT,
            _ => 0,
        };
        match self.changed_every {
            0 => all,
            every => all.div_ceil(every),
        }
    }

    /// The count of each of the four types.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        RESOURCE_TYPES
            .iter()
            .map(|t| (t.to_string(), self.count(t)))
            .collect()
    }

    /// All resources of all types.
    pub fn total(&self) -> usize {
        RESOURCE_TYPES.iter().map(|t| self.count(t)).sum()
    }

    /// The logical id of a resource. Ids embed the seed so that two data sets loaded into the
    /// same warehouse never collide, and the index so that they are unique per type.
    pub fn id(&self, resource_type: &str, index: usize) -> String {
        let index = self.base_index(index);
        let prefix = match resource_type {
            "Patient" => "pat",
            "Encounter" => "enc",
            "Observation" => "obs",
            "Condition" => "cond",
            other => other,
        };
        format!("{prefix}-{:x}-{index}", self.seed)
    }

    /// The index of the Patient whose compartment the `index`-th resource of `resource_type` is
    /// in (the Patient itself for a Patient); `None` for a type outside [`RESOURCE_TYPES`].
    pub fn patient_of(&self, resource_type: &str, index: usize) -> Option<usize> {
        let index = self.base_index(index);
        match resource_type {
            "Patient" => Some(index),
            "Encounter" => Some(index / ENCOUNTERS_PER_PATIENT),
            "Observation" => Some(index / OBSERVATIONS_PER_PATIENT),
            "Condition" => Some(index / CONDITIONS_PER_PATIENT),
            _ => None,
        }
    }

    /// The index of the Patient with logical id `id` (as [`Dataset::id`] makes them), if it
    /// is one of this data set's.
    pub fn patient_index(&self, id: &str) -> Option<usize> {
        let index: usize = id.rsplit('-').next()?.parse().ok()?;
        (index < self.patients && self.id("Patient", index) == id).then_some(index)
    }

    /// `meta.lastUpdated` of a resource, without building the rest of it. The export planner
    /// uses this to apply `_since` over millions of resources cheaply.
    pub fn last_updated(&self, resource_type: &str, index: usize) -> OffsetDateTime {
        if self.changed_every != 0 {
            return self.changed_last_updated(index);
        }
        let mut rng = self.rng(resource_type, index);
        from_millis(draw_last_updated_ms(&mut rng))
    }

    /// One resource as FHIR R4 JSON, identical for the same `(seed, resource_type, index)`.
    ///
    /// # Panics
    ///
    /// If `resource_type` is not one of [`RESOURCE_TYPES`]: there is nothing sensible to make up,
    /// and every caller in this crate only asks for types it got from that list.
    pub fn resource(&self, resource_type: &str, index: usize) -> Value {
        if self.changed_every != 0 {
            let original = Dataset::new(self.seed, self.patients);
            let mut resource = original.resource(resource_type, self.base_index(index));
            let version: u64 = resource["meta"]["versionId"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            resource["meta"] = json!({
                "versionId": (version + 1).to_string(),
                "lastUpdated": format_instant(self.changed_last_updated(index)),
            });
            return resource;
        }
        // The first draw must be lastUpdated, so that `last_updated` agrees with the resource.
        let mut rng = self.rng(resource_type, index);
        let last_updated = from_millis(draw_last_updated_ms(&mut rng));
        let meta = json!({
            "versionId": rng.random_range(1..=3u8).to_string(),
            "lastUpdated": format_instant(last_updated),
        });
        let mut resource = match resource_type {
            "Patient" => self.patient(&mut rng, index),
            "Encounter" => self.encounter(&mut rng, index, last_updated),
            "Observation" => self.observation(&mut rng, index, last_updated),
            "Condition" => self.condition(&mut rng, index, last_updated),
            other => panic!("the synthetic data set has no resources of type {other}"),
        };
        resource["resourceType"] = json!(resource_type);
        resource["id"] = json!(self.id(resource_type, index));
        resource["meta"] = meta;
        resource
    }

    /// The resource as one NDJSON line: compact JSON without the trailing newline.
    /// `resourceType` comes first, as real servers write it (JSON objects are unordered, but
    /// a loader that peeks at the start of a line should see what it would in production).
    pub fn ndjson_line(&self, resource_type: &str, index: usize) -> String {
        let mut resource = self.resource(resource_type, index);
        if let Some(fields) = resource.as_object_mut() {
            fields.remove("resourceType");
        }
        // Serialising a `Value` cannot fail: all its map keys are strings.
        let rest = serde_json::to_string(&resource).expect("a serde_json::Value always serialises");
        let type_json = serde_json::to_string(resource_type).expect("a string always serialises");
        // `rest` is a non-empty object, so it starts with `{` and has at least one field.
        format!("{{\"resourceType\":{type_json},{}", &rest[1..])
    }

    /// Changed versions are dated one second apart from the end of the original range, so every
    /// one is newer than any original version.
    fn changed_last_updated(&self, index: usize) -> OffsetDateTime {
        from_millis(LAST_UPDATED_END_MS + 1000 * index as i64)
    }

    fn rng(&self, resource_type: &str, index: usize) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed ^ stream_key(resource_type, index))
    }

    fn patient_ref(&self, patient: usize) -> Value {
        json!({ "reference": format!("Patient/{}", self.id("Patient", patient)) })
    }

    fn patient(&self, rng: &mut ChaCha8Rng, index: usize) -> Value {
        let gender = pick(
            rng,
            &["female", "male", "female", "male", "other", "unknown"],
        );
        let family = pick(rng, FAMILY_NAMES);
        let mut given = vec![pick(rng, GIVEN_NAMES).to_string()];
        if rng.random_bool(0.4) {
            given.push(pick(rng, GIVEN_NAMES).to_string());
        }
        // A nickname in quotes makes loaders handle an escaped `"` inside a string.
        let text = if rng.random_bool(0.3) {
            format!(
                "{} \"{}\" {}",
                given.join(" "),
                pick(rng, NICKNAMES),
                family
            )
        } else {
            format!("{} {}", given.join(" "), family)
        };
        let birth = Date::from_calendar_date(1930, time::Month::January, 1)
            .expect("1930-01-01 is a valid date")
            + Duration::days(rng.random_range(0..(90 * 365)));
        let (city, state, zip) = *pick(rng, CITIES);
        let mut line = vec![format!(
            "{} {}",
            rng.random_range(1..9999u32),
            pick(rng, STREETS)
        )];
        if rng.random_bool(0.25) {
            line.push(format!("Apt {}", rng.random_range(1..400u32)));
        }
        json!({
            "identifier": [{
                "use": "usual",
                "type": { "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                    "code": "MR",
                    "display": "Medical Record Number"
                }], "text": "Medical Record Number" },
                "system": "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14",
                "value": format!("MRN{:09}", (self.seed.wrapping_mul(31) as usize ^ index) % 1_000_000_000)
            }],
            "active": rng.random_bool(0.95),
            "name": [{
                "use": "official",
                "text": text,
                "family": family,
                "given": given,
            }],
            "telecom": [{
                "system": "phone",
                "value": format!("555-{:03}-{:04}", rng.random_range(200..999u32), rng.random_range(0..9999u32)),
                "use": pick(rng, &["home", "mobile"]),
            }],
            "gender": gender,
            "birthDate": format_date(birth),
            "address": [{
                "use": "home",
                "type": "physical",
                "line": line,
                "city": city,
                "state": state,
                "postalCode": zip,
                "country": "US",
            }],
            "communication": [{
                "language": { "coding": [{
                    "system": "urn:ietf:bcp:47",
                    "code": pick(rng, &["en-US", "en-US", "en-US", "es", "de", "vi"]),
                }] },
                "preferred": true,
            }],
        })
    }

    fn encounter(&self, rng: &mut ChaCha8Rng, index: usize, last_updated: OffsetDateTime) -> Value {
        let (class_code, class_display) = *pick(rng, ENCOUNTER_CLASSES);
        let (type_code, type_display) = *pick(rng, ENCOUNTER_TYPES);
        // The encounter happened before its record was last touched.
        let start = last_updated - Duration::minutes(rng.random_range(60..(3 * 365 * 24 * 60)));
        let length = if class_code == "IMP" {
            Duration::hours(rng.random_range(24..(10 * 24)))
        } else {
            Duration::minutes(rng.random_range(15..240))
        };
        let offset = pick_offset(rng);
        let finished = rng.random_bool(0.93);
        let mut period = json!({ "start": format_date_time(start, offset) });
        if finished {
            // A finished encounter ended before its record was last updated.
            let end = (start + length).min(last_updated);
            period["end"] = json!(format_date_time(end, offset));
        }
        json!({
            "identifier": [{
                "system": "urn:oid:1.2.840.114350.1.13.0.1.7.3.698084.8",
                "value": format!("{}", 100_000_000 + index),
            }],
            "status": if finished { "finished" } else { "in-progress" },
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": class_code,
                "display": class_display,
            },
            "type": [{
                "coding": [{ "system": "http://snomed.info/sct", "code": type_code, "display": type_display }],
                "text": type_display,
            }],
            "subject": self.patient_ref(index / ENCOUNTERS_PER_PATIENT),
            "period": period,
        })
    }

    fn observation(
        &self,
        rng: &mut ChaCha8Rng,
        index: usize,
        last_updated: OffsetDateTime,
    ) -> Value {
        let patient = index / OBSERVATIONS_PER_PATIENT;
        // Observations of a patient are spread evenly over that patient's encounters.
        let encounter = patient * ENCOUNTERS_PER_PATIENT
            + (index % OBSERVATIONS_PER_PATIENT)
                / (OBSERVATIONS_PER_PATIENT / ENCOUNTERS_PER_PATIENT);
        let lab = *pick(rng, LAB_CODES);
        let span = lab.high - lab.low;
        let raw = rng.random_range((lab.low - span * 0.3)..(lab.high + span * 0.3));
        let scale = 10f64.powi(lab.decimals);
        let value = (raw * scale).round() / scale;
        let (interp_code, interp_display) = if value < lab.low {
            ("L", "Low")
        } else if value > lab.high {
            ("H", "High")
        } else {
            ("N", "Normal")
        };
        let effective = last_updated - Duration::minutes(rng.random_range(30..(2 * 365 * 24 * 60)));
        let offset = pick_offset(rng);
        let issued = effective + Duration::minutes(rng.random_range(5..600));
        let quantity = |v: f64| json!({ "value": v, "unit": lab.unit, "system": "http://unitsofmeasure.org", "code": lab.ucum });
        let mut observation = json!({
            "status": if rng.random_bool(0.95) { "final" } else { "amended" },
            "category": [{
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": lab.category,
                    "display": if lab.category == "laboratory" { "Laboratory" } else { "Vital Signs" },
                }],
            }],
            "code": {
                "coding": [{ "system": "http://loinc.org", "code": lab.loinc, "display": lab.display }],
                "text": lab.display,
            },
            "subject": self.patient_ref(patient),
            "encounter": { "reference": format!("Encounter/{}", self.id("Encounter", encounter)) },
            "effectiveDateTime": format_date_time(effective, offset),
            "issued": format_instant(issued),
            "valueQuantity": quantity(value),
            "interpretation": [{
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                    "code": interp_code,
                    "display": interp_display,
                }],
            }],
            "referenceRange": [{
                "low": quantity(lab.low),
                "high": quantity(lab.high),
                "text": format!("{} to {} {}", lab.low, lab.high, lab.unit),
            }],
        });
        // Notes of varying length spread line sizes from about half a kilobyte to two, and some
        // carry quotes, backslashes and non-ASCII text that a loader must keep intact.
        let sentences = rng.random_range(0..=6);
        if sentences > 0 {
            let text = (0..sentences)
                .map(|_| *pick(rng, NOTE_SENTENCES))
                .collect::<Vec<_>>()
                .join(" ");
            observation["note"] = json!([{ "text": text }]);
        }
        // A systolic reading comes as the vital-signs profile's blood pressure panel: both
        // pressures as components, none as the value. The diastolic is derived from the
        // systolic rather than drawn, so every later draw (and the rest of the data) is as before.
        if lab.loinc == "8480-6" {
            let diastolic = (value * 0.65).round();
            let mm_hg = |v: f64| json!({ "value": v, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]" });
            if let Some(fields) = observation.as_object_mut() {
                fields.remove("valueQuantity");
                fields.remove("referenceRange");
            }
            observation["code"] = json!({
                "coding": [{ "system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel with all children optional" }],
                "text": "Blood pressure",
            });
            observation["component"] = json!([
                { "code": { "coding": [{ "system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure" }] },
                  "valueQuantity": mm_hg(value) },
                { "code": { "coding": [{ "system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure" }] },
                  "valueQuantity": mm_hg(diastolic) },
            ]);
        }
        observation
    }

    fn condition(&self, rng: &mut ChaCha8Rng, index: usize, last_updated: OffsetDateTime) -> Value {
        let (code, display) = *pick(rng, CONDITION_CODES);
        let onset = last_updated - Duration::days(rng.random_range(1..(15 * 365)));
        let recorded = onset + Duration::days(rng.random_range(0..30));
        let offset = pick_offset(rng);
        let clinical = *pick(
            rng,
            &["active", "active", "active", "resolved", "remission"],
        );
        let mut condition = json!({
            "clinicalStatus": { "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": clinical,
            }] },
            "verificationStatus": { "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed",
            }] },
            "category": [{ "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                "code": if rng.random_bool(0.7) { "problem-list-item" } else { "encounter-diagnosis" },
            }] }],
            "code": {
                "coding": [{ "system": "http://snomed.info/sct", "code": code, "display": display }],
                "text": display,
            },
            "subject": self.patient_ref(index / CONDITIONS_PER_PATIENT),
            "onsetDateTime": format_date_time(onset, offset),
            "recordedDate": format_date(recorded.date()),
        });
        if clinical == "resolved" {
            let abated = onset + Duration::days(rng.random_range(7..365));
            condition["abatementDateTime"] =
                json!(format_date_time(abated.min(last_updated), offset));
        }
        condition
    }
}

/// A per-(type, index) key mixed into the seed. FNV-1a and splitmix64 are spelled out here
/// because std's hasher is allowed to change between releases, and ids and data must not.
fn stream_key(resource_type: &str, index: usize) -> u64 {
    let mut type_hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in resource_type.bytes() {
        type_hash ^= u64::from(byte);
        type_hash = type_hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(type_hash ^ splitmix64(index as u64))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn draw_last_updated_ms(rng: &mut ChaCha8Rng) -> i64 {
    rng.random_range(LAST_UPDATED_START_MS..LAST_UPDATED_END_MS)
}

fn from_millis(ms: i64) -> OffsetDateTime {
    // The range above is well inside what `OffsetDateTime` represents.
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("lastUpdated is within 2024-2025")
}

/// A FHIR `instant` in UTC with milliseconds, e.g. `2024-05-06T07:08:09.123Z`.
pub(crate) fn format_instant(at: OffsetDateTime) -> String {
    at.to_offset(UtcOffset::UTC)
        .format(INSTANT_MS)
        .expect("a UTC date in range always formats")
}

fn format_date_time(at: OffsetDateTime, offset: UtcOffset) -> String {
    at.to_offset(offset)
        .format(DATE_TIME_OFFSET)
        .expect("a date in range always formats")
}

fn format_date(date: Date) -> String {
    date.format(DATE).expect("a date in range always formats")
}

/// Local offsets of the sites the data pretends to come from, so that loaders see both `Z`-less
/// negative offsets and `+00:00`.
fn pick_offset(rng: &mut ChaCha8Rng) -> UtcOffset {
    let hours = *pick(rng, &[-5i8, -6, -5, -7, 0, 1]);
    UtcOffset::from_hms(hours, 0, 0).expect("whole-hour offsets are valid")
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

const GIVEN_NAMES: &[&str] = &[
    "Zoë", "José", "Amelia", "Liam", "Olivia", "Noah", "Chidi", "Søren", "Mei", "Anaïs", "Fatima",
    "Dmitri", "Aroha", "Björn", "Priya", "Mateo", "Grace", "Kwame", "Élodie", "Hiroshi",
];
const FAMILY_NAMES: &[&str] = &[
    "Smith",
    "Johnson",
    "Müller",
    "García",
    "O'Neil",
    "Nguyễn",
    "Østergaard",
    "Kowalski",
    "Brown",
    "Okafor",
    "Yamamoto",
    "Dubois",
    "Łukasiewicz",
    "Hernández",
    "Patel",
    "Van der Berg",
];
const NICKNAMES: &[&str] = &["Bob", "Liz", "Bean", "Doc", "Sunny", "Kiki"];
const STREETS: &[&str] = &[
    "Main St",
    "Oak Ave",
    "Maple Dr",
    "Cedar Ln",
    "Elm St",
    "Washington Blvd",
    "Lakeview Rd",
    "Peachtree St NE",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("Madison", "WI", "53703"),
    ("Boston", "MA", "02115"),
    ("Kansas City", "MO", "64105"),
    ("Austin", "TX", "78701"),
    ("Portland", "OR", "97205"),
    ("Atlanta", "GA", "30303"),
    ("Verona", "WI", "53593"),
];
const ENCOUNTER_CLASSES: &[(&str, &str)] = &[
    ("AMB", "ambulatory"),
    ("AMB", "ambulatory"),
    ("AMB", "ambulatory"),
    ("EMER", "emergency"),
    ("IMP", "inpatient encounter"),
    ("VR", "virtual"),
];
const ENCOUNTER_TYPES: &[(&str, &str)] = &[
    ("185349003", "Encounter for check up (procedure)"),
    ("185345009", "Encounter for symptom (procedure)"),
    ("390906007", "Follow-up encounter (procedure)"),
    ("270427003", "Patient-initiated encounter (procedure)"),
    ("50849002", "Emergency room admission (procedure)"),
];
const CONDITION_CODES: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2 (disorder)"),
    (
        "38341003",
        "Hypertensive disorder, systemic arterial (disorder)",
    ),
    ("195967001", "Asthma (disorder)"),
    ("55822004", "Hyperlipidemia (disorder)"),
    ("35489007", "Depressive disorder (disorder)"),
    ("40055000", "Chronic sinusitis (disorder)"),
    ("271737000", "Anemia (disorder)"),
    ("399211009", "History of myocardial infarction (situation)"),
    ("162864005", "Body mass index 30+ - obesity (finding)"),
    ("444814009", "Viral sinusitis (disorder)"),
];

#[derive(Clone, Copy)]
struct LabCode {
    loinc: &'static str,
    display: &'static str,
    category: &'static str,
    unit: &'static str,
    ucum: &'static str,
    low: f64,
    high: f64,
    decimals: i32,
}

const LAB_CODES: &[LabCode] = &[
    LabCode {
        loinc: "8867-4",
        display: "Heart rate",
        category: "vital-signs",
        unit: "/min",
        ucum: "/min",
        low: 60.0,
        high: 100.0,
        decimals: 0,
    },
    LabCode {
        loinc: "8480-6",
        display: "Systolic blood pressure",
        category: "vital-signs",
        unit: "mmHg",
        ucum: "mm[Hg]",
        low: 90.0,
        high: 130.0,
        decimals: 0,
    },
    LabCode {
        loinc: "8462-4",
        display: "Diastolic blood pressure",
        category: "vital-signs",
        unit: "mmHg",
        ucum: "mm[Hg]",
        low: 60.0,
        high: 85.0,
        decimals: 0,
    },
    LabCode {
        loinc: "29463-7",
        display: "Body weight",
        category: "vital-signs",
        unit: "kg",
        ucum: "kg",
        low: 50.0,
        high: 100.0,
        decimals: 1,
    },
    LabCode {
        loinc: "8310-5",
        display: "Body temperature",
        category: "vital-signs",
        unit: "°C",
        ucum: "Cel",
        low: 36.1,
        high: 37.8,
        decimals: 1,
    },
    LabCode {
        loinc: "59408-5",
        display: "Oxygen saturation in Arterial blood by Pulse oximetry",
        category: "vital-signs",
        unit: "%",
        ucum: "%",
        low: 95.0,
        high: 100.0,
        decimals: 0,
    },
    LabCode {
        loinc: "2339-0",
        display: "Glucose [Mass/volume] in Blood",
        category: "laboratory",
        unit: "mg/dL",
        ucum: "mg/dL",
        low: 70.0,
        high: 140.0,
        decimals: 0,
    },
    LabCode {
        loinc: "718-7",
        display: "Hemoglobin [Mass/volume] in Blood",
        category: "laboratory",
        unit: "g/dL",
        ucum: "g/dL",
        low: 12.0,
        high: 17.5,
        decimals: 1,
    },
    LabCode {
        loinc: "2093-3",
        display: "Cholesterol [Mass/volume] in Serum or Plasma",
        category: "laboratory",
        unit: "mg/dL",
        ucum: "mg/dL",
        low: 125.0,
        high: 200.0,
        decimals: 0,
    },
    LabCode {
        loinc: "4548-4",
        display: "Hemoglobin A1c/Hemoglobin.total in Blood",
        category: "laboratory",
        unit: "%",
        ucum: "%",
        low: 4.0,
        high: 5.6,
        decimals: 1,
    },
];

const NOTE_SENTENCES: &[&str] = &[
    "Patient reports feeling \"much better\" since the last visit and denies chest pain, shortness of breath or palpitations.",
    "Specimen collected at the bedside after a twelve-hour fast; repeat measurement requested if the result is outside the reference range.",
    "Scanned requisition filed at \\\\fs01\\lab\\requisitions\\2024\\ for audit; original paper copy destroyed per retention policy.",
    "Interpreter present for the visit (Vietnamese, Tiếng Việt); patient's daughter Zoë also attended and asked about follow-up.",
    "Value confirmed by repeat analysis on a second analyser; no haemolysis, lipaemia or icterus noted on the sample.",
    "Nurse note: cuff size adult large, left arm, patient seated for five minutes before measurement; reading taken twice and averaged.",
    "Result communicated to the ordering clinician by phone; read-back confirmed. Patient advised to continue current regimen.",
    "Comment from the lab: \"sample received at 18 °C, within acceptable transport limits\" — no action required.",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_the_same_resource() {
        let a = Dataset::new(7, 10);
        let b = Dataset::new(7, 10);
        for t in RESOURCE_TYPES {
            for i in [0, 1, 9] {
                assert_eq!(a.resource(t, i), b.resource(t, i), "{t} {i}");
                assert_eq!(a.ndjson_line(t, i), b.ndjson_line(t, i));
            }
        }
    }

    #[test]
    fn different_seeds_give_different_ids_and_data() {
        let a = Dataset::new(1, 5);
        let b = Dataset::new(2, 5);
        for t in RESOURCE_TYPES {
            assert_ne!(a.resource(t, 0)["id"], b.resource(t, 0)["id"], "{t}");
            assert_ne!(a.ndjson_line(t, 0), b.ndjson_line(t, 0), "{t}");
        }
    }

    #[test]
    fn ids_are_unique_per_type() {
        let d = Dataset::new(42, 20);
        for t in RESOURCE_TYPES {
            let ids: std::collections::HashSet<String> =
                (0..d.count(t)).map(|i| d.id(t, i)).collect();
            assert_eq!(ids.len(), d.count(t), "{t}");
            assert_ne!(d.resource(t, 0)["id"], d.resource(t, 1)["id"]);
        }
    }

    #[test]
    fn counts_follow_the_patient_count() {
        let d = Dataset::new(3, 10);
        assert_eq!(d.count("Patient"), 10);
        assert_eq!(d.count("Encounter"), 30);
        assert_eq!(d.count("Observation"), 120);
        assert_eq!(d.count("Condition"), 20);
        assert_eq!(d.count("Medication"), 0);
        assert_eq!(d.total(), 180);
        assert_eq!(d.counts().len(), 4);
        assert_eq!(d.counts().values().sum::<usize>(), d.total());
        assert_eq!(Dataset::new(3, 0).total(), 0);
    }

    fn is_fhir_id(id: &str) -> bool {
        (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    }

    #[test]
    fn every_line_is_a_valid_resource_of_its_type() {
        let d = Dataset::new(0xdead_beef_cafe_f00d, 25);
        for t in RESOURCE_TYPES {
            for i in 0..d.count(t) {
                let line = d.ndjson_line(t, i);
                assert!(!line.contains('\n'), "{t} {i} spans lines");
                assert!(line.starts_with(&format!("{{\"resourceType\":\"{t}\",")));
                let v: Value = serde_json::from_str(&line).expect("line is JSON");
                assert_eq!(v, d.resource(t, i));
                assert_eq!(v["resourceType"], t);
                let id = v["id"].as_str().expect("id is a string");
                assert!(is_fhir_id(id), "{id} is not a FHIR id");
                let version = v["meta"]["versionId"].as_str().expect("versionId");
                assert!(["1", "2", "3"].contains(&version));
                let updated = v["meta"]["lastUpdated"].as_str().expect("lastUpdated");
                assert!(updated.ends_with('Z'), "{updated}");
                let parsed =
                    OffsetDateTime::parse(updated, &time::format_description::well_known::Rfc3339)
                        .expect("lastUpdated is RFC 3339");
                assert!((2024..=2025).contains(&parsed.year()));
                assert_eq!(parsed, d.last_updated(t, i));
            }
        }
    }

    #[test]
    fn references_point_at_the_owning_patient_and_encounter() {
        let d = Dataset::new(11, 4);
        let enc = d.resource("Encounter", 7);
        assert_eq!(
            enc["subject"]["reference"],
            format!("Patient/{}", d.id("Patient", 2))
        );
        let obs = d.resource("Observation", 25);
        assert_eq!(
            obs["subject"]["reference"],
            format!("Patient/{}", d.id("Patient", 2))
        );
        // Observation 25 is the second of patient 2's twelve, so it belongs to that patient's
        // first encounter, index 6.
        assert_eq!(
            obs["encounter"]["reference"],
            format!("Encounter/{}", d.id("Encounter", 6))
        );
        let cond = d.resource("Condition", 5);
        assert_eq!(
            cond["subject"]["reference"],
            format!("Patient/{}", d.id("Patient", 2))
        );
    }

    #[test]
    fn resources_carry_the_expected_content() {
        let d = Dataset::new(5, 3);
        let p = d.resource("Patient", 0);
        for field in ["identifier", "name", "gender", "birthDate", "address"] {
            assert!(!p[field].is_null(), "Patient.{field}");
        }
        let e = d.resource("Encounter", 0);
        for field in ["status", "class", "type", "subject", "period"] {
            assert!(!e[field].is_null(), "Encounter.{field}");
        }
        let o = d.resource("Observation", 0);
        for field in [
            "status",
            "category",
            "code",
            "subject",
            "encounter",
            "effectiveDateTime",
            "valueQuantity",
        ] {
            assert!(!o[field].is_null(), "Observation.{field}");
        }
        assert_eq!(o["code"]["coding"][0]["system"], "http://loinc.org");
        let c = d.resource("Condition", 0);
        for field in ["clinicalStatus", "code", "subject", "onsetDateTime"] {
            assert!(!c[field].is_null(), "Condition.{field}");
        }
        assert_eq!(c["code"]["coding"][0]["system"], "http://snomed.info/sct");
    }

    #[test]
    fn observations_are_between_half_and_two_kilobytes() {
        let d = Dataset::new(9, 20);
        let sizes: Vec<usize> = (0..d.count("Observation"))
            .map(|i| d.ndjson_line("Observation", i).len())
            .collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(*min >= 450, "smallest observation is {min} bytes");
        assert!(*max <= 2200, "largest observation is {max} bytes");
        assert!(max - min > 500, "sizes should vary, got {min}..{max}");
    }

    #[test]
    fn some_lines_need_json_escaping_and_are_not_ascii() {
        let d = Dataset::new(1, 30);
        let lines: Vec<String> = RESOURCE_TYPES
            .iter()
            .flat_map(|t| (0..d.count(t)).map(move |i| (t, i)))
            .map(|(t, i)| d.ndjson_line(t, i))
            .collect();
        assert!(lines.iter().any(|l| l.contains("\\\"")), "an escaped quote");
        assert!(
            lines.iter().any(|l| l.contains("\\\\")),
            "an escaped backslash"
        );
        assert!(lines.iter().any(|l| l.contains("Zoë")), "a non-ASCII name");
    }

    #[test]
    fn the_changed_generation_is_every_nth_resource_in_a_newer_version() {
        let d = Dataset::new(9, 7);
        let changed = d.changed(10);
        assert_eq!(
            changed.count("Observation"),
            d.count("Observation").div_ceil(10)
        );
        assert_eq!(changed.count("Patient"), 1);
        for index in 0..changed.count("Observation") {
            let old = d.resource("Observation", index * 10);
            let new = changed.resource("Observation", index);
            assert_eq!(new["id"], old["id"]);
            assert_eq!(new["subject"], old["subject"]);
            assert!(
                changed.last_updated("Observation", index)
                    > d.last_updated("Observation", index * 10)
            );
            let version = |r: &Value| {
                r["meta"]["versionId"]
                    .as_str()
                    .unwrap()
                    .parse::<u32>()
                    .unwrap()
            };
            assert_eq!(version(&new), version(&old) + 1);
            assert_eq!(
                new["meta"]["lastUpdated"].as_str().unwrap(),
                format_instant(changed.last_updated("Observation", index))
            );
        }
    }
}
