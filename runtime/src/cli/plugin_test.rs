//! `refract plugin test`: a plugin on the events of a file, offline, with a
//! trace of what each event did, the final tables, and a comparison with
//! what is expected (the work is in [`refract::harness`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use refract::harness::{Contents, Expected, Final, Harness, Step, emitted_json};
use refract::plugin::Handler;
use refract::plugin::trace::HostCall;

/// How many entries of each table the text output shows (`--json`: all).
const SHOWN: usize = 20;

/// What `refract plugin test` was asked.
pub(crate) struct TestArgs {
    /// A component, or a plugin's directory (its built component, `events.ndjson`, `expected.json`).
    pub target: PathBuf,
    pub events: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub expect: Option<PathBuf>,
    /// The stream of events whose line names none (default: the first subscribed).
    pub stream: Option<String>,
    /// `name=value` settings, as `plugins.<name>.settings` gives them.
    pub settings: Vec<String>,
    pub json: bool,
    /// Print no trace, only the outcome (and batch events as a server does).
    pub quiet: bool,
}

/// The starting tables (`--state`): `{"tables": {table: {key: value}}}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    tables: BTreeMap<String, Contents>,
}

fn read_json<T: serde::de::DeserializeOwned>(file: &Path, what: &str) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {what} {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{what} {} is not what it should be", file.display()))
}

/// Run the test; an error (exit status 1) when it differs from what is expected.
pub(crate) fn test(args: TestArgs) -> anyhow::Result<()> {
    let (component, dir) = if args.target.is_dir() {
        let file = args.target.join(super::authoring::output_name(&args.target.canonicalize()?));
        if !file.is_file() {
            bail!("{} is not built yet: run `refract plugin build {}` first", file.display(), args.target.display());
        }
        (file, Some(args.target.clone()))
    } else {
        (args.target.clone(), args.target.parent().map(Path::to_owned))
    };
    let beside = |name: &str| dir.as_ref().map(|d| d.join(name)).filter(|f| f.is_file());
    // The directory's events and expectation go together: other events, no expectation unless named.
    let (events_file, expect_file) = match (args.events, args.expect) {
        (Some(events), expect) => (events, expect),
        (None, expect) => match beside("events.ndjson") {
            Some(events) => (events, expect.or_else(|| beside("expected.json"))),
            None => bail!("no events: pass --events FILE (NDJSON, one event per line as appended)"),
        },
    };

    let mut plugin = super::authoring::load(&component)?;
    let mut settings = BTreeMap::new();
    for setting in &args.settings {
        let Some((name, value)) = setting.split_once('=') else {
            bail!("--setting {setting:?}: write it name=value");
        };
        settings.insert(name.to_owned(), value.to_owned());
    }
    let env = refract::plugin::Environment { settings: std::sync::Arc::new(settings), ..Default::default() };
    plugin.configure(env, &[], refract::plugin::wasm::PluginLimits::default()).map_err(anyhow::Error::msg)?;
    let stream = match args.stream {
        Some(s) => s,
        None => plugin.manifest().subscriptions[0].stream.clone(),
    };
    let text = std::fs::read_to_string(&events_file).with_context(|| format!("reading {}", events_file.display()))?;
    let events =
        refract::harness::read_events(&text, &stream).map_err(|e| anyhow::anyhow!("{}: {e}", events_file.display()))?;
    let expected: Option<Expected> = expect_file.as_deref().map(|f| read_json(f, "the expectation")).transpose()?;

    let mut harness = Harness::new(plugin, !args.quiet)?;
    if let Some(file) = &args.state {
        let state: State = read_json(file, "the state")?;
        harness.load_tables(&state.tables).with_context(|| format!("loading {}", file.display()))?;
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut failure = None;
    let started = std::time::Instant::now();
    harness.run(&events, |step| {
        let written = if args.json { writeln!(out, "{}", step.to_json()) } else { write_step(&mut out, &step) };
        if let Err(e) = written {
            failure.get_or_insert(e);
        }
    })?;
    let took = started.elapsed();
    if let Some(e) = failure {
        return Err(e).context("writing the trace");
    }
    let end = harness.end()?;
    let differences = expected.map(|e| e.differences(&end)).unwrap_or_default();
    let (applied, failed, skipped) = harness.counts();
    if args.json {
        let result = json!({"final": end, "applied": applied, "skipped": skipped, "differences": differences});
        writeln!(out, "{result}")?;
    } else {
        writeln!(
            out,
            "{} events in {:.2} s: {applied} applied, {failed} failed{}{}",
            events.len(),
            took.as_secs_f64(),
            if failed > 0 { " (a server dead-letters those)" } else { "" },
            if skipped > 0 { format!(", {skipped} skipped (not subscribed to)") } else { String::new() }
        )?;
        write_final(&mut out, &end)?;
    }
    out.flush()?;
    drop(out);
    match expect_file {
        Some(file) if !differences.is_empty() => {
            eprintln!("{} differs from what the plugin did:", file.display());
            for d in &differences {
                eprintln!("  {d}");
            }
            bail!("{} difference(s) from {}", differences.len(), file.display())
        }
        Some(file) => {
            eprintln!("as expected ({})", file.display());
            Ok(())
        }
        None => Ok(()),
    }
}

/// A value on one line, cut at 200 characters.
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn write_step(out: &mut impl Write, step: &Step<'_>) -> std::io::Result<()> {
    let e = step.event;
    let key = e.key.as_deref().map(|k| format!(" key {k}")).unwrap_or_default();
    writeln!(out, "#{} {} {}:{} {}{key} time {}", step.index, e.stream, e.partition, e.offset, e.event_type, e.time)?;
    for call in &step.calls {
        // Keys, prefixes, settings and errors quoted as JSON strings.
        let quoted = |s: &str| Value::from(s).to_string();
        let read = |value: &Option<Value>, error: &Option<String>| match error {
            Some(e) => format!("error: {}", quoted(e)),
            None => value.as_ref().map_or_else(|| "none".to_owned(), short),
        };
        let line = match call {
            HostCall::Get { table, key, value, error } => {
                format!("get      {table}[{}] → {}", quoted(key), read(value, error))
            }
            HostCall::Scan { table, prefix, entries, error, .. } => format!(
                "scan     {table}[{} …] → {} entries{}",
                quoted(prefix),
                entries.len(),
                error.as_deref().map(|e| format!(" (error: {})", quoted(e))).unwrap_or_default()
            ),
            HostCall::Lookup { projection, table, key, value, error } => {
                format!("lookup   {projection}/{table}[{}] → {}", quoted(key), read(value, error))
            }
            HostCall::Setting { name, value } => format!("setting  {name} → {}", Value::from(value.clone())),
            HostCall::Log { level, message } => format!("log      {level}: {message}"),
        };
        writeln!(out, "   {line}")?;
    }
    for (table, keys) in &step.writes {
        for (key, value) in keys {
            match value {
                Some(v) => writeln!(out, "   put      {table}[{key:?}] = {}", short(v))?,
                None => writeln!(out, "   delete   {table}[{key:?}]")?,
            }
        }
    }
    for (index, ids) in &step.documents {
        for (id, document) in ids {
            match document {
                Some(d) => writeln!(out, "   index    {index}[{id:?}] = {}", short(d))?,
                None => writeln!(out, "   unindex  {index}[{id:?}]")?,
            }
        }
    }
    for emitted in &step.emitted {
        let key = emitted.key.as_deref().map(|k| format!(" key {k}")).unwrap_or_default();
        writeln!(
            out,
            "   emit     {} {}{key} {}",
            emitted.stream,
            emitted.event_type,
            short(&emitted_json(emitted)["data"])
        )?;
    }
    if step.unrouted > 0 {
        writeln!(out, "   ({} output(s) no route took)", step.unrouted)?;
    }
    match &step.outcome {
        Ok(()) => writeln!(out, "   ✓ applied"),
        Err(e) => writeln!(out, "   ✗ {e}"),
    }
}

fn write_final(out: &mut impl Write, end: &Final) -> std::io::Result<()> {
    let (tables, documents, emitted) = (&end.tables, &end.documents, &end.emitted);
    let contents = |out: &mut dyn Write, what: &str, name: &str, c: &Contents| -> std::io::Result<()> {
        writeln!(out, "{what} {name} ({} entries)", c.len())?;
        for (key, value) in c.iter().take(SHOWN) {
            writeln!(out, "  {key:?} = {}", short(value))?;
        }
        if c.len() > SHOWN {
            writeln!(out, "  … and {} more (--json shows all)", c.len() - SHOWN)?;
        }
        Ok(())
    };
    for (name, c) in tables {
        contents(out, "table", name, c)?;
    }
    for (name, c) in documents {
        contents(out, "index", name, c)?;
    }
    if !emitted.is_empty() {
        writeln!(out, "emitted ({} events)", emitted.len())?;
        for e in emitted.iter().take(SHOWN) {
            writeln!(
                out,
                "  {} {} key {} {}",
                e["stream"].as_str().unwrap_or_default(),
                e["type"].as_str().unwrap_or_default(),
                e["key"],
                short(&e["data"])
            )?;
        }
        if emitted.len() > SHOWN {
            writeln!(out, "  … and {} more (--json shows all)", emitted.len() - SHOWN)?;
        }
    }
    Ok(())
}
