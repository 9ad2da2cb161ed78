//! Log output: human lines or one flat JSON object per line, on stderr, with the ids of the
//! spans an event happened in (`job.name`, `run.id`, `file.id`, `resource.type`) on every line.
//!
//! Formats only what the code chose to log; it must never add request headers, URLs with their
//! query or any other value an event did not name. Lines go through [`super::progress`] so
//! they print above live progress bars instead of through them.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LoggingSettings};

/// Installs the global `tracing` subscriber: human or JSON lines on stderr, filtered by
/// `RUST_LOG` when set, else by `logging.level`. Colours only when stderr is a terminal, so a
/// log file or a pipe never receives escape codes.
pub fn init_logging(settings: &LoggingSettings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let ansi = std::io::stderr().is_terminal();
    // A second call (tests, or a library user with their own subscriber) keeps the first one.
    let _ = subscriber(settings.format, filter, super::progress::LogWriter, ansi).try_init();
}

/// The subscriber [`init_logging`] installs, writing to `writer` (tests capture with it).
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync + 'static>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Human => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .with_ansi(false)
                .fmt_fields(JsonFields::new())
                .event_format(FlatJson)
                .finish(),
        ),
    }
}

/// One JSON object per event: `timestamp`, `level`, `target`, `span` (the innermost span's
/// name), then the fields of every enclosing span from the outermost in, then the event's own
/// fields (`message` included). Flat, so a log shipper can index `run.id` without knowing
/// which span carried it; an inner span's field wins over an outer one of the same name.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        let timestamp = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(metadata.level().to_string()));
        line.insert(
            "target".into(),
            Value::String(metadata.target().to_string()),
        );
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                line.insert("span".into(), Value::String(span.name().to_string()));
                let extensions = span.extensions();
                // The fmt layer stores each span's fields as the JSON object `JsonFields` wrote.
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(fields)) = serde_json::from_str(fields.as_str())
                {
                    line.extend(fields);
                }
            }
        }
        event.record(&mut FieldVisitor(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Copies an event's fields into the line, as JSON numbers and booleans where they are.
struct FieldVisitor<'a>(&'a mut Map<String, Value>);

impl FieldVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        // Events bridged from the `log` crate (rustls, for one) carry their metadata as `log.*`
        // fields under the target `log`; the real target replaces it, the rest is noise.
        match field.name() {
            "log.target" => {
                self.0.insert("target".into(), value);
            }
            name if name.starts_with("log.") => {}
            name => {
                self.0.insert(name.to_string(), value);
            }
        }
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(format: LogFormat, emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(
            format,
            EnvFilter::new("trace"),
            move || writer.clone(),
            false,
        );
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    fn emit_in_spans() {
        let step = tracing::info_span!("step", run.id = 7_i64, job.name = tracing::field::Empty);
        let _step = step.enter();
        // Recorded after the span was created, as the step handler does once it knows the job.
        step.record("job.name", "epic");
        let file = tracing::info_span!("file", file.id = 42_i64, resource.type = "Patient");
        let _file = file.enter();
        tracing::info!(lines = 10_u64, "file loaded");
    }

    #[test]
    fn json_lines_are_flat_and_carry_every_span_field() {
        let out = capture(LogFormat::Json, emit_in_spans);
        let line: Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(line["run.id"], 7);
        assert_eq!(line["job.name"], "epic");
        assert_eq!(line["file.id"], 42);
        assert_eq!(line["resource.type"], "Patient");
        assert_eq!(line["lines"], 10);
        assert_eq!(line["message"], "file loaded");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["span"], "file");
    }

    #[test]
    fn human_lines_show_the_span_fields_without_colour() {
        let out = capture(LogFormat::Human, emit_in_spans);
        for expected in ["run.id=7", "job.name=\"epic\"", "file.id=42", "file loaded"] {
            assert!(out.contains(expected), "{expected} missing from {out}");
        }
        assert!(!out.contains('\u{1b}'), "no escape codes: {out:?}");
    }
}
