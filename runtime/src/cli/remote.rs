//! The commands that talk to a running runtime over its HTTP API:
//! `produce`, `rebuild`, `status` and `dead-letters`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use refract::api::dto::{DeadLetterPage, ErrorBody, ProjectionList, RebuildCancelled, RebuildStarted, Retried};
use refract::cluster::ClusterView;
use refract::runtime::{ProjectionStatus, ShardRole};
use refract_client::{Client, Reply};
use serde::de::DeserializeOwned;

/// Where a running runtime is, and the token to show it.
#[derive(clap::Args)]
pub(crate) struct Remote {
    /// The runtime's address.
    #[arg(long, env = "REFRACT_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// The bearer token: the admin token for changes, the query token (or
    /// the admin token) for reads. Default: $REFRACT_ADMIN_TOKEN, else
    /// $REFRACT_QUERY_TOKEN.
    #[arg(long, hide_env_values = true, global = true)]
    pub token: Option<String>,
}

impl Remote {
    /// A client of the runtime, with the token.
    pub(crate) fn client(&self) -> Client {
        let env = |name: &str| std::env::var(name).ok().filter(|t| !t.is_empty());
        let token = self.token.clone().or_else(|| env("REFRACT_ADMIN_TOKEN")).or_else(|| env("REFRACT_QUERY_TOKEN"));
        Client::new(&self.url).with_token(token.as_deref())
    }
}

#[derive(Subcommand)]
pub(crate) enum DeadLetterAction {
    /// Print one dead letter in full.
    Show { id: u64 },
    /// Hand the events to the plugin again (after a fix): one, or every one.
    Retry { id: Option<u64> },
    /// Drop a dead letter, leaving its event unapplied.
    Skip { id: u64 },
    /// Write a folder that reproduces the failure offline: the event, the
    /// exact component that failed, the values it read (handed the event
    /// again over the read model as it is now, rolled back), and the
    /// `refract plugin test` command.
    Reproduce {
        id: u64,
        /// The folder (default: ./reproduce-<projection>-<id>).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

/// `refract dead-letters`.
pub(crate) fn dead_letters(projection: &str, action: Option<DeadLetterAction>, remote: &Remote) -> anyhow::Result<()> {
    let (client, url) = (remote.client(), &remote.url);
    let base = format!("/v1/projections/{projection}/dead-letters");
    if let Some(DeadLetterAction::Reproduce { id, out }) = &action {
        let out = out.clone().unwrap_or_else(|| PathBuf::from(format!("reproduce-{projection}-{id}")));
        return reproduce(&client, projection, *id, &out).with_context(|| format!("asking {url}"));
    }
    let reply = match &action {
        None => client.get(&format!("{base}?limit=1000")),
        Some(DeadLetterAction::Show { id }) => client.get(&format!("{base}/{id}")),
        Some(DeadLetterAction::Retry { id: Some(id) }) => {
            client.post(&format!("{base}/{id}/retry"), "application/json", b"")
        }
        Some(DeadLetterAction::Retry { id: None }) => client.post(&format!("{base}/retry"), "application/json", b""),
        Some(DeadLetterAction::Skip { id }) => client.delete(&format!("{base}/{id}")),
        Some(DeadLetterAction::Reproduce { .. }) => unreachable!("answered above"),
    }
    .with_context(|| format!("asking {url}"))?;
    if reply.status != 200 {
        bail!("{}: {}", reply.status, error_message(&reply));
    }
    match action {
        None => {
            let page: DeadLetterPage = body(reply)?;
            if page.dead_letters.is_empty() {
                println!("{projection} holds no dead letters");
            }
            for l in page.dead_letters {
                let (id, l) = (l.id, l.letter);
                println!("{id:>6}  {}/{}@{}  {}  {}", l.stream, l.partition, l.offset, l.event_type, l.error);
            }
        }
        Some(DeadLetterAction::Retry { .. }) => {
            let report: Retried = body(reply)?;
            println!("applied: {}; failed again: {}", report.applied.len(), report.failed.len());
            for f in report.failed {
                println!("{:>6}  {}", f.id, f.error);
            }
        }
        _ => println!("{:#}", reply.body),
    }
    Ok(())
}

/// `refract dead-letters <p> reproduce <id>`: ask for the reproduction of
/// dead letter `id` and write it, with its component, to the folder `out`.
fn reproduce(client: &refract_client::Client, projection: &str, id: u64, out: &std::path::Path) -> anyhow::Result<()> {
    let reply = client.get(&format!("/v1/projections/{projection}/dead-letters/{id}/reproduction"))?;
    if reply.status != 200 {
        bail!("{}: {}", reply.status, error_message(&reply));
    }
    let r = reply.body;
    let digest = r["component"].as_str().context("the reproduction names no component")?;
    let (status, component) = client.get_bytes(&format!("/v1/projections/{projection}/components/{digest}"))?;
    if status != 200 {
        bail!("fetching the component {digest}: {status}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        std::fs::write(out.join(name), bytes).with_context(|| format!("writing {}", out.join(name).display()))
    };
    write("plugin.wasm", &component)?;
    write("event.ndjson", format!("{}\n", r["event"]).as_bytes())?;
    write("state.json", format!("{:#}\n", r["state"]).as_bytes())?;
    let trace = serde_json::json!({"deadLetter": r["deadLetter"], "calls": r["calls"], "outcome": r["outcome"]});
    write("trace.json", format!("{trace:#}\n").as_bytes())?;
    let letter = &r["deadLetter"];
    let again = if r["sameError"] == true {
        "It failed again, with the same error, when the reproduction was made.".to_owned()
    } else {
        format!("When the reproduction was made it ended otherwise: {}.", r["outcome"])
    };
    let readme = format!(
        "# Dead letter {id} of {stream}/{partition}@{offset}\n\n\
         The plugin `{version}` (component `plugin.wasm`, SHA-256 `{digest}`) failed on the event in\n\
         `event.ndjson` with:\n\n```\n{error}\n```\n\n{again}\n\n\
         `state.json` holds every value the plugin read while handling it, taken from the read model\n\
         as it was when this folder was made (not when the event failed); `trace.json` its calls in order.\n\n\
         Reproduce it offline, in the real engine:\n\n```sh\n{command}\n```\n\n\
         Then fix the plugin, build it, and run the same command on the new build; once it applies,\n\
         deploy it and retry the letter: `refract dead-letters <projection> retry {id}`.\n",
        id = letter["id"],
        stream = letter["stream"].as_str().unwrap_or_default(),
        partition = letter["partition"],
        offset = letter["offset"],
        version = letter["pluginVersion"].as_str().unwrap_or_default(),
        error = letter["error"].as_str().unwrap_or_default(),
        command = r["command"].as_str().unwrap_or_default(),
    );
    write("README.md", readme.as_bytes())?;
    println!("wrote {}: plugin.wasm, event.ndjson, state.json, trace.json, README.md", out.display());
    println!("reproduce it: cd {} && {}", out.display(), r["command"].as_str().unwrap_or_default());
    Ok(())
}

/// Send NDJSON from `file` (or stdin) to `stream` in requests of `batch` lines.
pub(crate) fn produce(stream: &str, file: Option<PathBuf>, batch: usize, remote: &Remote) -> anyhow::Result<()> {
    // A file's size makes a progress bar (bytes read, rate, ETA); stdin has none.
    let (input, size): (Box<dyn Read>, Option<u64>) = match &file {
        Some(p) if p.as_os_str() != "-" => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let size = f.metadata().ok().map(|m| m.len());
            (Box::new(f), size)
        }
        _ => (Box::new(std::io::stdin()), None),
    };
    let mut progress = size.map(|_| Progress::new("KiB"));
    let (started, mut read_bytes) = (Instant::now(), 0u64);
    let (client, url) = (remote.client(), &remote.url);
    let (mut sent, mut first_line, mut line_no) = (0usize, 1usize, 0usize);
    let mut body = Vec::new();
    let mut count = 0;
    let send = |body: &mut Vec<u8>, count: &mut usize, first_line: usize| -> anyhow::Result<usize> {
        if *count == 0 {
            return Ok(0);
        }
        let reply = client.append_ndjson(stream, body).with_context(|| format!("sending to {url}"))?;
        if reply.status != 200 {
            let message = error_message(&reply);
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
            if let (Some(size), Some(progress)) = (size, &mut progress) {
                let rate = read_bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let eta = size.saturating_sub(read_bytes) as f64 / rate.max(1.0);
                progress.update(read_bytes >> 10, size >> 10, rate / 1024.0, Some(eta), &format!(" ({sent} events)"));
            }
        }
    }
    sent += send(&mut body, &mut count, first_line)?;
    if let Some(progress) = &progress {
        progress.finish();
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "appended {sent} events to stream {stream} in {seconds:.1} s ({:.0} events/s)",
        sent as f64 / seconds.max(1e-3)
    );
    Ok(())
}

pub(crate) fn rebuild(projection: &str, remote: &Remote, detach: bool, cancel: bool) -> anyhow::Result<()> {
    let (client, url) = (remote.client(), &remote.url);
    let path = format!("/v1/projections/{projection}/rebuild");
    let reply = if cancel { client.delete(&path) } else { client.post(&path, "application/json", b"") }
        .with_context(|| format!("reaching {url}"))?;
    if reply.status >= 300 {
        anyhow::bail!(
            "{} {}: {}",
            reply.status,
            if cancel { "cancelling" } else { "rebuilding" },
            error_message(&reply)
        );
    }
    if cancel {
        let cancelled: RebuildCancelled = body(reply)?;
        eprintln!("cancelled the rebuild of {projection} (generation {})", cancelled.cancelled);
        return Ok(());
    }
    let RebuildStarted { generation, .. } = body(reply)?;
    eprintln!("rebuilding {projection} into generation {generation}");
    if detach {
        return Ok(());
    }
    follow(&client, projection, generation, false)
}

/// Show the progress of the rebuild of `projection` into `generation`
/// until it is live (a `preview`: until it has caught up with the live one).
pub(crate) fn follow(client: &Client, projection: &str, generation: u64, preview: bool) -> anyhow::Result<()> {
    let mut progress = Progress::new("events");
    loop {
        let reply = client.get(&format!("/v1/projections/{projection}"))?;
        if reply.status != 200 {
            anyhow::bail!("{} reading the status of {projection}: {}", reply.status, error_message(&reply));
        }
        let status: ProjectionStatus = body(reply)?;
        let Some(r) = status.rebuild.filter(|r| r.generation == generation) else {
            if status.generation != generation {
                let what = if preview { "preview" } else { "rebuild" };
                anyhow::bail!(
                    "the {what} stopped before switching (cancelled?); generation {} is live",
                    status.generation
                );
            }
            progress.finish();
            eprintln!("generation {generation} of {projection} is live ({} events)", status.counters.events_applied);
            return Ok(());
        };
        if preview && r.caught_up {
            progress.finish();
            return Ok(());
        }
        progress.update(r.replayed, r.target.max(1), r.events_per_second, r.eta_seconds, "");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How far a long command has got: a bar redrawn in place on a terminal
/// (indicatif), a line every 5 s when stderr is a log.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    unit: &'static str,
    last_line: Instant,
}

impl Progress {
    fn new(unit: &'static str) -> Self {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = tty.then(|| {
            let style = indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} {prefix}, {msg}")
                .expect("the template parses")
                .progress_chars("#>-");
            indicatif::ProgressBar::new(0).with_style(style).with_prefix(unit)
        });
        Progress { bar, unit, last_line: Instant::now() - Duration::from_secs(10) }
    }

    /// `done` of `total`, going at `rate` per second, done in `eta_seconds`.
    fn update(&mut self, done: u64, total: u64, rate: f64, eta_seconds: Option<f64>, note: &str) {
        let eta = eta_seconds.map_or_else(|| "?".into(), |s| format!("{s:.0}s"));
        let message = format!("{rate:.0}/s, ETA {eta}{note}");
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done.min(total));
                bar.set_message(message);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                eprintln!("{done}/{total} {}, {message}", self.unit);
                self.last_line = Instant::now();
            }
            None => {}
        }
    }

    /// Leave the bar as it is and go to the next line.
    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// `refract status`: one row per projection.
pub(crate) fn status(remote: &Remote, watch: bool) -> anyhow::Result<()> {
    let mut previous: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
    show(remote, "/v1/projections", watch, |list: ProjectionList| {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING).set_header([
            "NAME",
            "KIND",
            "STATE",
            "GEN",
            "APPLIED",
            "RATE/S",
            "LAG",
            "DEAD",
            "INDEX LAG",
            "REBUILD",
            "LAST ERROR",
        ]);
        for p in list.projections {
            let applied = p.counters.events_applied;
            let rate = match previous.insert(p.name.clone(), (applied, Instant::now())) {
                Some((before, at)) if at.elapsed() > Duration::ZERO => {
                    format!("{:.0}", applied.saturating_sub(before) as f64 / at.elapsed().as_secs_f64())
                }
                _ => "-".into(),
            };
            let index_lag: u64 = p.indexes.iter().map(|i| i.lag).sum();
            let rebuild = match &p.rebuild {
                None => "-".into(),
                Some(r) if r.preview && r.caught_up => format!("preview gen {}: caught up", r.generation),
                Some(r) => format!(
                    "{}gen {} {}/{}",
                    if r.preview { "preview " } else { "" },
                    r.generation,
                    r.replayed,
                    r.target
                ),
            };
            let mut error = p.worker.last_error.as_deref().unwrap_or("-").replace('\n', " ");
            if error.chars().count() > 60 {
                error = error.chars().take(57).collect::<String>() + "...";
            }
            table.add_row([
                p.name,
                text_of(&p.plugin.kind),
                text_of(&p.worker.state),
                p.generation.to_string(),
                applied.to_string(),
                rate,
                p.lag.to_string(),
                p.counters.dead_letters.to_string(),
                if p.indexes.is_empty() { "-".into() } else { index_lag.to_string() },
                rebuild,
                error,
            ]);
        }
        let mut out = table.trim_fmt();
        out.push('\n');
        for e in list.plugin_errors {
            let state = if e.retrying { "waiting" } else { "not loaded" };
            out.push_str(&format!("{state}: {}: {}\n", e.file, e.error));
        }
        out
    })
}

/// `refract status --cluster`: one row per instance on the control topic.
pub(crate) fn cluster_status(remote: &Remote, watch: bool) -> anyhow::Result<()> {
    show(remote, "/v1/cluster", watch, |view: ClusterView| {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING).set_header([
            "INSTANCE",
            "URL",
            "LIVE",
            "SILENT",
            "PROJECTIONS (GEN APPLIED LAG)",
        ]);
        for m in view.members {
            let a = m.announcement;
            let held: Vec<String> = a
                .projections
                .iter()
                .map(|p| {
                    let mut held = format!("{} {} {} {}", p.name, p.generation, p.events_applied, p.lag);
                    let list = |role| {
                        let shards = p.shards.iter().filter(|s| s.role == role);
                        let shards = shards.map(|s| {
                            let mut notes = Vec::new();
                            if !s.ready {
                                notes.push("restoring".to_owned());
                            }
                            if let Some(r) = s.rebuild {
                                let how = if r.caught_up { "caught up" } else { "rebuilding" };
                                notes.push(format!("gen {} {how}", r.generation));
                            }
                            match notes.is_empty() {
                                true => s.shard.to_string(),
                                false => format!("{}({})", s.shard, notes.join("; ")),
                            }
                        });
                        shards.collect::<Vec<_>>().join(",")
                    };
                    for (role, what) in [(ShardRole::Active, "shards"), (ShardRole::Standby, "standby")] {
                        let shards = list(role);
                        if !shards.is_empty() {
                            held.push_str(&format!(" {what} {shards}"));
                        }
                    }
                    held
                })
                .collect();
            let me = if a.instance == view.instance { " (this)" } else { "" };
            table.add_row([
                format!("{}{me}", a.instance),
                a.url,
                if m.live { "yes".into() } else { "no".into() },
                format!("{:.1}s", m.silent_ms as f64 / 1000.0),
                if held.is_empty() { "-".into() } else { held.join(", ") },
            ]);
        }
        let mut out = table.trim_fmt();
        out.push('\n');
        out
    })
}

/// GET `path` and print what `render` makes of its body; with `watch`,
/// clear the terminal and do it again every 2 seconds until interrupted.
fn show<T: DeserializeOwned>(
    remote: &Remote,
    path: &str,
    watch: bool,
    mut render: impl FnMut(T) -> String,
) -> anyhow::Result<()> {
    let (client, url) = (remote.client(), &remote.url);
    loop {
        let reply = client.get(path).with_context(|| format!("reaching {url}"))?;
        if reply.status != 200 {
            anyhow::bail!("{}: {}", reply.status, error_message(&reply));
        }
        let text = render(body(reply)?);
        // One write per frame, so a redraw does not flicker.
        print!("{}{text}", if watch { "\x1b[2J\x1b[H" } else { "" });
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// How a value is spelled in the API (`"running"`, `"projection"`), without the quotes.
fn text_of(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => other.map(|v| v.to_string()).unwrap_or_default(),
    }
}

/// What an error reply says: the API's message, or the body as it came.
pub(crate) fn error_message(reply: &Reply) -> String {
    serde_json::from_value::<ErrorBody>(reply.body.clone()).map_or_else(|_| reply.body.to_string(), |e| e.error.message)
}

/// A successful reply's body as the API's type for it.
pub(crate) fn body<T: DeserializeOwned>(reply: Reply) -> anyhow::Result<T> {
    serde_json::from_value(reply.body).context("the runtime answered in a shape this version of refract does not read")
}
