//! The `refract` command: run the runtime, append events, run the demo.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use refract::client::Client;
use refract::config::Config;
use refract::runtime::Runtime;
use serde_json::Value;
use tracing_subscriber::EnvFilter;

// Batches allocate and free many small strings, across the reader and worker
// threads; mimalloc handles that far better than the system allocator.
// `refract::allocator::configure` (first thing in `main`) tunes it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Refract: WebAssembly projections over event streams, served as queryable read models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the runtime: load plugins, project events, serve the HTTP API.
    Run(RunArgs),
    /// Append NDJSON events (one JSON event per line) to a stream of a running runtime.
    Produce {
        /// The stream to append to.
        stream: String,
        /// The NDJSON file; `-` or nothing reads standard input.
        file: Option<PathBuf>,
        /// The runtime's address.
        #[arg(long, env = "REFRACT_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Events per request.
        #[arg(long, default_value_t = 5000)]
        batch: usize,
        /// The admin token, when the runtime requires one.
        #[arg(long, env = "REFRACT_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Rebuild a projection's read model from the beginning of its streams on a
    /// running runtime (blue/green: queries keep being answered meanwhile),
    /// showing progress until the new generation is live.
    Rebuild {
        /// The projection to rebuild.
        projection: String,
        /// The runtime's address.
        #[arg(long, env = "REFRACT_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The admin token.
        #[arg(long, env = "REFRACT_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Start it and return at once.
        #[arg(long)]
        detach: bool,
        /// Cancel the rebuild in progress instead.
        #[arg(long, conflicts_with = "detach")]
        cancel: bool,
    },
    /// Show the projections and enrichers of a running runtime: state, lag,
    /// throughput, dead letters and the last error, as a table.
    Status {
        /// The runtime's address.
        #[arg(long, env = "REFRACT_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The query token (or the admin token), when the runtime requires one.
        #[arg(long, env = "REFRACT_QUERY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Redraw every 2 seconds, with throughput, until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// List a projection's dead letters, or retry or skip them, on a running runtime.
    DeadLetters {
        projection: String,
        #[command(subcommand)]
        action: Option<DeadLetterAction>,
        /// The runtime's address.
        #[arg(long, env = "REFRACT_URL", default_value = "http://127.0.0.1:8080", global = true)]
        url: String,
        /// The admin token (retry and skip need it).
        #[arg(long, env = "REFRACT_ADMIN_TOKEN", hide_env_values = true, global = true)]
        token: Option<String>,
    },
    /// Write plugins: scaffold, build and check them.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Run the demo: start the runtime with the example plugins, append sample
    /// orders and account movements, and print queries to try.
    Demo {
        #[command(flatten)]
        run: RunArgs,
        /// How many order events to append (account events: half as many).
        #[arg(long, default_value_t = 5000)]
        events: usize,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Create a plugin in ./<name>: source, a unit test, README, and the SDK in .refract/.
    New {
        name: String,
        #[arg(long, value_enum)]
        lang: refract::authoring::Lang,
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
    /// Check that a component fits a Refract world, and print its manifest.
    Check {
        file: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print one dead letter in full.
    Show { id: u64 },
    /// Hand the events to the plugin again (after a fix): one, or every one.
    Retry { id: Option<u64> },
    /// Drop a dead letter, leaving its event unapplied.
    Skip { id: u64 },
}

/// `refract dead-letters`.
fn dead_letters(
    projection: &str,
    action: Option<DeadLetterAction>,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let client = Client::new(url).with_token(token);
    let base = format!("/v1/projections/{projection}/dead-letters");
    let reply = match &action {
        None => client.get(&format!("{base}?limit=1000")),
        Some(DeadLetterAction::Show { id }) => client.get(&format!("{base}/{id}")),
        Some(DeadLetterAction::Retry { id: Some(id) }) => {
            client.post(&format!("{base}/{id}/retry"), "application/json", b"")
        }
        Some(DeadLetterAction::Retry { id: None }) => client.post(&format!("{base}/retry"), "application/json", b""),
        Some(DeadLetterAction::Skip { id }) => client.delete(&format!("{base}/{id}")),
    }
    .with_context(|| format!("asking {url}"))?;
    if reply.status != 200 {
        bail!("{}: {}", reply.status, reply.body["error"]["message"].as_str().unwrap_or(""));
    }
    match action {
        None => {
            let letters = reply.body["deadLetters"].as_array().cloned().unwrap_or_default();
            if letters.is_empty() {
                println!("{projection} holds no dead letters");
            }
            for l in letters {
                println!(
                    "{:>6}  {}/{}@{}  {}  {}",
                    l["id"],
                    l["stream"].as_str().unwrap_or(""),
                    l["partition"],
                    l["offset"],
                    l["type"].as_str().unwrap_or(""),
                    l["error"].as_str().unwrap_or("")
                );
            }
        }
        Some(DeadLetterAction::Retry { .. }) => {
            let b = &reply.body;
            println!("applied: {}; failed again: {}", b["applied"], b["failed"].as_array().map_or(0, Vec::len));
            for f in b["failed"].as_array().into_iter().flatten() {
                println!("{:>6}  {}", f["id"], f["error"].as_str().unwrap_or(""));
            }
        }
        _ => println!("{:#}", reply.body),
    }
    Ok(())
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PluginKind {
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

fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    use refract::authoring;
    match command {
        PluginCommand::New { name, lang, kind } => {
            let dir = authoring::new(Path::new("."), &name, lang, kind.into())?;
            println!("created {}; next: cd {} && refract plugin build", dir.display(), dir.display());
        }
        PluginCommand::Build { dir, out, kind } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let file = authoring::build(&dir, out, kind.map(Into::into))?;
            print_checked(&file, &authoring::check(&file)?, false);
        }
        PluginCommand::Check { file, json } => print_checked(&file, &authoring::check(&file)?, json),
    }
    Ok(())
}

fn print_checked(file: &Path, c: &refract::authoring::Checked, json: bool) {
    let m = &c.manifest;
    if json {
        let subscriptions: Vec<_> = m
            .subscriptions
            .iter()
            .map(|s| serde_json::json!({"stream": s.stream, "eventTypes": s.event_types}))
            .collect();
        let indexes: Vec<_> = c.indexes.iter().map(|i| i.name.clone()).collect();
        let batches = if c.packed { "packed" } else { "typed" };
        let out = serde_json::json!({"file": file, "kind": c.kind, "batches": batches, "name": m.name, "version": m.version,
            "schemaVersion": m.schema_version, "subscriptions": subscriptions, "tables": m.tables, "indexes": indexes});
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
    for i in &c.indexes {
        let fields: Vec<String> = i.fields.iter().map(|f| format!("{}:{:?}", f.name, f.type_)).collect();
        println!("  index           {} ({})", i.name, fields.join(", "));
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// The configuration file (default: ./refract.yaml if it exists, else built-in defaults).
    #[arg(long, short, env = "REFRACT_CONFIG")]
    config: Option<PathBuf>,
    /// Override `data-dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override `plugins-dir`.
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// Override `listen` (host:port).
    #[arg(long)]
    listen: Option<String>,
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let path = self.config.clone().or_else(|| {
            let default = PathBuf::from("refract.yaml");
            default.exists().then_some(default)
        });
        let mut config = match &path {
            Some(p) => {
                tracing::info!(config = %p.display(), "reading configuration");
                Config::load(p)?
            }
            None => Config::default(),
        };
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(d) = &self.plugins_dir {
            config.plugins_dir = d.clone();
        }
        if let Some(l) = &self.listen {
            config.listen = l.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    refract::allocator::configure();
    // Logs go to stderr, as text or (REFRACT_LOG_FORMAT=json) one JSON object
    // per line with the current spans (a batch's projection, plugin version
    // and positions); RUST_LOG filters them.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,wasmtime=warn"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    if std::env::var("REFRACT_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().with_current_span(true).with_span_list(false).init();
    } else {
        logs.init();
    }
    match Cli::parse().command {
        Command::Run(args) => run(args.config()?, None),
        Command::Produce { stream, file, url, batch, token } => {
            produce(&stream, file, &url, batch.max(1), token.as_deref())
        }
        Command::Rebuild { projection, url, token, detach, cancel } => {
            rebuild(&projection, &url, token.as_deref(), detach, cancel)
        }
        Command::Plugin(command) => plugin_command(command),
        Command::Status { url, token, watch } => status(&url, token.as_deref(), watch),
        Command::DeadLetters { projection, action, url, token } => {
            dead_letters(&projection, action, &url, token.as_deref())
        }
        Command::Demo { run: args, events } => {
            let mut config = args.config()?;
            if args.data_dir.is_none() && args.config.is_none() {
                config.data_dir = PathBuf::from("refract-demo-data");
            }
            config.streams.partitions.entry("accounts".into()).or_insert(1);
            // The join enricher's routes, unless the configuration has its own.
            config.plugins.entry("orders-payments-join".into()).or_insert_with(|| {
                let routes = "- { types: [OrderReadyForShipment], to: [shipping, notifications] }\n\
                              - { types: [OrderUnpaid], to: [notifications] }";
                refract::config::PluginConfig {
                    routes: serde_saphyr::from_str(routes).expect("the demo's routes parse"),
                    ..Default::default()
                }
            });
            run(config, Some(events))
        }
    }
}

/// Start the runtime and serve until Ctrl-C or SIGTERM; with `demo`, also feed it sample events.
fn run(config: Config, demo: Option<usize>) -> anyhow::Result<()> {
    let runtime = Runtime::start(&config)?;
    let tokio = tokio::runtime::Runtime::new()?;
    let listener = tokio
        .block_on(tokio::net::TcpListener::bind(&config.listen))
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, data_dir = %config.data_dir.display(), plugins_dir = %config.plugins_dir.display(), projections = runtime.projections().len(), "refract is serving");
    if let Some(events) = demo {
        let url = format!("http://{address}");
        std::thread::spawn(move || {
            if let Err(e) = feed_demo(&url, events) {
                tracing::error!(error = %e, "the demo could not append its events");
            }
        });
    }
    let served = tokio.block_on(refract::api::serve(
        refract::api::AppState::new(runtime.clone(), &config),
        listener,
        shutdown_signal(),
    ));
    runtime.shutdown();
    served.context("serving HTTP")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

fn ndjson(events: &[serde_json::Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        serde_json::to_writer(&mut out, e).expect("events serialize");
        out.push(b'\n');
    }
    out
}

fn feed_demo(url: &str, n: usize) -> anyhow::Result<()> {
    let token = std::env::var("REFRACT_ADMIN_TOKEN").ok();
    let client = Client::new(url).with_token(token.as_deref());
    let orders = refract::fixtures::orders(n, 1, 0.01);
    let accounts = refract::fixtures::accounts(n / 2, 1, 0.02);
    let started = Instant::now();
    for (stream, events) in [("orders", &orders), ("accounts", &accounts)] {
        for chunk in events.chunks(2000) {
            let reply = client.append_ndjson(stream, &ndjson(chunk))?;
            if reply.status != 200 {
                bail!("appending to {stream}: {} {}", reply.status, reply.body);
            }
        }
    }
    let caught_up = client.wait_caught_up(Duration::from_secs(120))?;
    let customer = orders[0]["data"]["customerId"].as_str().unwrap_or("c-1");
    let order = orders[0]["key"].as_str().unwrap_or("o-1");
    println!(
        "\nRefract demo: appended {} orders events and {} accounts events; projections {} in {:.1}s.\n\
         Try:\n\
         \x20 curl -s {url}/v1/projections | jq\n\
         \x20 curl -s {url}/v1/projections/order-summary/tables/orders/items/{order} | jq\n\
         \x20 curl -s '{url}/v1/projections/order-summary/tables/customer-orders/items?prefix={customer}/' | jq\n\
         \x20 curl -s {url}/v1/projections/account-balance/tables/balances/items/a-1 | jq\n\
         \x20 curl -s '{url}/v1/projections/account-balance/tables/history/items?prefix=a-1/&limit=5' | jq\n\
         \x20 curl -s {url}/v1/projections/order-summary/dead-letters | jq\n\
         \x20 curl -s '{url}/v1/projections/order-search/indexes/orders/search?q=lamp+AND+coffee&sort=total:desc&limit=3' | jq\n\
         \x20 curl -s '{url}/v1/projections/order-search/indexes/orders/search?filter=total:%5B100+TO+*%5D&facets=status&limit=1' | jq\n\
         \x20 curl -s '{url}/v1/projections?kind=enricher' | jq   # orders-payments-join: orders joined with payments\n\
         \x20 curl -s '{url}/v1/projections/shipments/tables/ready/items?limit=3' | jq   # paid orders, from the `shipping` stream\n\
         \x20 echo '{{\"type\":\"OrderPlaced\",\"key\":\"o-new\",\"data\":{{\"orderId\":\"o-new\",\"customerId\":\"c-1\",\"total\":42.5}}}}' \\\n\
         \x20   | curl -s -H 'content-type: application/x-ndjson' --data-binary @- {url}/v1/streams/orders/events\n\
         Press Ctrl-C to stop.\n",
        orders.len(),
        accounts.len(),
        if caught_up { "caught up" } else { "are still catching up" },
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Send NDJSON from `file` (or stdin) to `stream` in requests of `batch` lines.
fn produce(stream: &str, file: Option<PathBuf>, url: &str, batch: usize, token: Option<&str>) -> anyhow::Result<()> {
    // A file's size makes a progress bar (bytes read, rate, ETA); stdin has none.
    let (input, size): (Box<dyn Read>, Option<u64>) = match &file {
        Some(p) if p.as_os_str() != "-" => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let size = f.metadata().ok().map(|m| m.len());
            (Box::new(f), size)
        }
        _ => (Box::new(std::io::stdin()), None),
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (started, mut last_line, mut read_bytes) = (Instant::now(), Instant::now(), 0u64);
    let client = Client::new(url).with_token(token);
    let (mut sent, mut first_line, mut line_no) = (0usize, 1usize, 0usize);
    let mut body = Vec::new();
    let mut count = 0;
    let send = |body: &mut Vec<u8>, count: &mut usize, first_line: usize| -> anyhow::Result<usize> {
        if *count == 0 {
            return Ok(0);
        }
        let reply = client.append_ndjson(stream, body).with_context(|| format!("sending to {url}"))?;
        if reply.status != 200 {
            let message = reply.body["error"]["message"].as_str().unwrap_or("").to_owned();
            bail!(
                "the runtime refused the events of lines {first_line}.. ({}): {message}; nothing from line {first_line} on was appended",
                reply.status
            );
        }
        let n = std::mem::take(count);
        body.clear();
        Ok(n)
    };
    for line in BufReader::new(input).lines() {
        let line = line.context("reading input")?;
        line_no += 1;
        read_bytes += line.len() as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&line) {
            bail!("line {line_no} is not JSON: {e}; events before line {first_line} were appended");
        }
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
        count += 1;
        if count == batch {
            sent += send(&mut body, &mut count, first_line)?;
            first_line = line_no + 1;
            if let Some(size) = size {
                let rate = read_bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let eta = size.saturating_sub(read_bytes) as f64 / rate.max(1.0);
                let line = progress_line(read_bytes >> 10, size >> 10, "KiB", rate / 1024.0, Some(eta));
                show_progress(&format!("{line} ({sent} events)"), tty, &mut last_line);
            }
        }
    }
    sent += send(&mut body, &mut count, first_line)?;
    if tty && size.is_some() && sent > batch {
        eprintln!();
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "appended {sent} events to stream {stream} in {seconds:.1} s ({:.0} events/s)",
        sent as f64 / seconds.max(1e-3)
    );
    Ok(())
}

fn rebuild(projection: &str, url: &str, token: Option<&str>, detach: bool, cancel: bool) -> anyhow::Result<()> {
    let client = Client::new(url).with_token(token);
    let path = format!("/v1/projections/{projection}/rebuild");
    let reply = if cancel { client.delete(&path) } else { client.post(&path, "application/json", b"") }
        .with_context(|| format!("reaching {url}"))?;
    if reply.status >= 300 {
        let message = reply.body["error"]["message"].as_str().map_or_else(|| reply.body.to_string(), str::to_owned);
        anyhow::bail!("{} {}: {message}", reply.status, if cancel { "cancelling" } else { "rebuilding" });
    }
    if cancel {
        eprintln!("cancelled the rebuild of {projection} (generation {})", reply.body["cancelled"]);
        return Ok(());
    }
    let generation = reply.body["generation"].as_u64().unwrap_or(0);
    eprintln!("rebuilding {projection} into generation {generation}");
    if detach {
        return Ok(());
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let status = client.get(&format!("/v1/projections/{projection}"))?.body;
        if status["generation"].as_u64() == Some(generation) && status["rebuild"].is_null() {
            if tty {
                eprintln!();
            }
            eprintln!("generation {generation} of {projection} is live ({} events)", status["eventsApplied"]);
            return Ok(());
        }
        if status["rebuild"].is_null() && status["generation"].as_u64() != Some(generation) {
            anyhow::bail!(
                "the rebuild stopped before switching (cancelled?); generation {} is live",
                status["generation"]
            );
        }
        let r = &status["rebuild"];
        let (done, target) = (r["replayed"].as_u64().unwrap_or(0), r["target"].as_u64().unwrap_or(0).max(1));
        let line = progress_line(
            done,
            target,
            "events",
            r["eventsPerSecond"].as_f64().unwrap_or(0.0),
            r["etaSeconds"].as_f64(),
        );
        show_progress(&line, tty, &mut last_line);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `[####------] done/total unit, rate/s, ETA`.
fn progress_line(done: u64, total: u64, unit: &str, rate: f64, eta_seconds: Option<f64>) -> String {
    let fraction = (done as f64 / total.max(1) as f64).min(1.0);
    let width = 30;
    let filled = (fraction * width as f64) as usize;
    let eta = eta_seconds.map_or_else(|| "?".into(), |s| format!("{s:.0}s"));
    format!("[{}{}] {done}/{total} {unit}, {rate:.0}/s, ETA {eta}", "#".repeat(filled), "-".repeat(width - filled))
}

/// A bar redrawn in place on a terminal; a line every 5 s in a log.
fn show_progress(line: &str, tty: bool, last_line: &mut Instant) {
    if tty {
        eprint!("\r{line}");
    } else if last_line.elapsed() >= Duration::from_secs(5) {
        eprintln!("{line}");
        *last_line = Instant::now();
    }
}

/// `refract status`: one row per projection.
fn status(url: &str, token: Option<&str>, watch: bool) -> anyhow::Result<()> {
    let client = Client::new(url).with_token(token);
    let mut previous: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
    loop {
        let reply = client.get("/v1/projections").with_context(|| format!("reaching {url}"))?;
        if reply.status != 200 {
            let message = reply.body["error"]["message"].as_str().unwrap_or("").to_owned();
            anyhow::bail!("{}: {message}", reply.status);
        }
        let mut rows = vec![
            ["NAME", "KIND", "STATE", "GEN", "APPLIED", "RATE/S", "LAG", "DEAD", "INDEX LAG", "REBUILD", "LAST ERROR"]
                .map(str::to_owned),
        ];
        for p in reply.body["projections"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or("?").to_owned();
            let applied = p["eventsApplied"].as_u64().unwrap_or(0);
            let rate = match previous.insert(name.clone(), (applied, Instant::now())) {
                Some((before, at)) if at.elapsed() > Duration::ZERO => {
                    format!("{:.0}", applied.saturating_sub(before) as f64 / at.elapsed().as_secs_f64())
                }
                _ => "-".into(),
            };
            let index_lag: u64 = p["indexes"].as_array().into_iter().flatten().filter_map(|i| i["lag"].as_u64()).sum();
            let rebuild = match &p["rebuild"] {
                Value::Null => "-".into(),
                r => format!("gen {} {}/{}", r["generation"], r["replayed"], r["target"]),
            };
            let mut error = p["lastError"].as_str().unwrap_or("-").replace('\n', " ");
            if error.chars().count() > 60 {
                error = error.chars().take(57).collect::<String>() + "...";
            }
            rows.push([
                name,
                text_of(&p["plugin"]["kind"]),
                text_of(&p["state"]),
                p["generation"].to_string(),
                applied.to_string(),
                rate,
                p["lag"].to_string(),
                p["deadLetters"].to_string(),
                if p["indexes"].as_array().is_some_and(|i| !i.is_empty()) { index_lag.to_string() } else { "-".into() },
                rebuild,
                error,
            ]);
        }
        let widths: Vec<usize> =
            (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        if watch {
            out.push_str("\x1b[2J\x1b[H"); // clear the terminal
        }
        for row in &rows {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        for e in reply.body["pluginErrors"].as_array().into_iter().flatten() {
            out.push_str(&format!("not loaded: {}: {}\n", text_of(&e["file"]), text_of(&e["error"])));
        }
        print!("{out}");
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// A JSON string's text, or any other value as JSON.
fn text_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}
