//! `refract plugin new | build | test | check`: the plugin author's commands
//! (the work is in [`super::authoring`] and [`super::plugin_test`]).

use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::{authoring, plugin_test};

#[derive(Subcommand)]
pub(crate) enum PluginCommand {
    /// Create a plugin in ./<name>: source, a unit test, README, and the SDK in .refract/.
    New {
        name: String,
        #[arg(long, value_enum)]
        lang: authoring::Lang,
        #[arg(long, value_enum, default_value = "projection")]
        kind: PluginKind,
    },
    /// Build the plugin in DIR (default: .) into a component, with cargo,
    /// componentize-py or componentize-js, then check it.
    Build {
        dir: Option<PathBuf>,
        /// Where to write the component (default: DIR/<name>.wasm).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Python/JavaScript: the world, when the source does not say (default: from the source).
        #[arg(long, value_enum)]
        kind: Option<PluginKind>,
    },
    /// Run a plugin on events from a file, offline, in the real engine on a
    /// scratch read model: print what each event read and wrote (searches
    /// indexed, events emitted, log lines, failures), then the final tables;
    /// with an expectation, exit 1 on any difference, naming the key.
    Test {
        /// The component, or the plugin's directory (default: .): its built
        /// component, and, without --events, its `events.ndjson` checked
        /// against its `expected.json` when there.
        target: Option<PathBuf>,
        /// NDJSON events, one per line as appended (`{"type", "key"?, "time"?,
        /// "headers"?, "data"}`), each with an optional `"stream"`.
        #[arg(long)]
        events: Option<PathBuf>,
        /// The tables to start from: `{"tables": {table: {key: value}}}`.
        #[arg(long)]
        state: Option<PathBuf>,
        /// What the run must end with: `{"tables"?, "documents"?, "emitted"?, "failed"?}`.
        #[arg(long)]
        expect: Option<PathBuf>,
        /// The stream of the events that name none (default: the first the plugin reads).
        #[arg(long)]
        stream: Option<String>,
        /// A setting, as `plugins.<name>.settings` would give it (repeatable).
        #[arg(long = "setting", value_name = "NAME=VALUE")]
        settings: Vec<String>,
        /// Print the trace as JSON lines: one per event, then the final state.
        #[arg(long)]
        json: bool,
        /// No trace: events go in batches as on a server; only failures and the end are printed.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check that a component fits a Refract world, and print its manifest.
    Check {
        file: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PluginKind {
    Projection,
    Enricher,
}

impl From<PluginKind> for refract::plugin::Kind {
    fn from(k: PluginKind) -> Self {
        match k {
            PluginKind::Projection => refract::plugin::Kind::Projection,
            PluginKind::Enricher => refract::plugin::Kind::Enricher,
        }
    }
}

pub(crate) fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::New { name, lang, kind } => {
            let dir = authoring::new(Path::new("."), &name, lang, kind.into())?;
            println!(
                "created {}; next: cd {} && refract plugin build && refract plugin test",
                dir.display(),
                dir.display()
            );
        }
        PluginCommand::Build { dir, out, kind } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let file = authoring::build(&dir, out, kind.map(Into::into))?;
            print_checked(&file, &authoring::check(&file)?, false);
        }
        PluginCommand::Test { target, events, state, expect, stream, settings, json, quiet } => {
            let target = target.unwrap_or_else(|| PathBuf::from("."));
            plugin_test::test(plugin_test::TestArgs { target, events, state, expect, stream, settings, json, quiet })?;
        }
        PluginCommand::Check { file, json } => print_checked(&file, &authoring::check(&file)?, json),
    }
    Ok(())
}

fn print_checked(file: &Path, c: &authoring::Checked, json: bool) {
    let m = &c.manifest;
    if json {
        let subscriptions: Vec<_> = m
            .subscriptions
            .iter()
            .map(|s| serde_json::json!({"stream": s.stream, "eventTypes": s.event_types}))
            .collect();
        let indexes: Vec<_> = c.indexes.iter().map(|i| i.name.clone()).collect();
        let batches = if c.packed { "packed" } else { "typed" };
        let keyed: Vec<_> =
            c.keyed_tables.iter().map(|k| serde_json::json!({"table": k.table, "separator": k.separator})).collect();
        let out = serde_json::json!({"file": file, "kind": c.kind, "batches": batches, "name": m.name, "version": m.version,
            "schemaVersion": m.schema_version, "subscriptions": subscriptions, "tables": m.tables, "keyedTables": keyed,
            "indexes": indexes});
        println!("{out:#}");
        return;
    }
    let kind = match c.kind {
        refract::plugin::Kind::Projection => "a projection",
        refract::plugin::Kind::Enricher => "an enricher",
    };
    println!("{}: {kind}", file.display());
    println!("  name            {}", m.name);
    println!("  version         {}", m.version);
    println!("  schema-version  {}", m.schema_version);
    let batches = match (c.packed, c.kind) {
        (true, refract::plugin::Kind::Projection) => "packed (handle-packed)",
        (true, refract::plugin::Kind::Enricher) => "packed (enrich-packed)",
        (false, refract::plugin::Kind::Projection) => "typed records (handle)",
        (false, refract::plugin::Kind::Enricher) => "typed records (enrich)",
    };
    println!("  batches         {batches}");
    for s in &m.subscriptions {
        let types = if s.event_types.is_empty() { "every type".to_owned() } else { s.event_types.join(", ") };
        println!("  reads           {} ({types})", s.stream);
    }
    println!("  tables          {}", if m.tables.is_empty() { "none".to_owned() } else { m.tables.join(", ") });
    for k in &c.keyed_tables {
        match &k.separator {
            None => println!("  keyed table     {} (keys are the events' keys)", k.table),
            Some(s) => println!("  keyed table     {} (keys are the events' keys, then {s:?} and more)", k.table),
        }
    }
    for i in &c.indexes {
        let fields: Vec<String> = i.fields.iter().map(|f| format!("{}:{:?}", f.name, f.type_)).collect();
        println!("  index           {} ({})", i.name, fields.join(", "));
    }
}
