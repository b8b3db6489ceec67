//! The `refract` command: run the runtime, talk to a running one, write
//! plugins, run the demo. Each command's work is in [`cli`].

mod cli;

use clap::{Parser, Subcommand};
use cli::plugin::PluginCommand;
use cli::preview::PreviewAction;
use cli::remote::{DeadLetterAction, Remote};
use cli::serve::RunArgs;
use std::path::PathBuf;
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
        /// Events per request.
        #[arg(long, default_value_t = 5000)]
        batch: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// Rebuild a projection's read model from the beginning of its streams on a
    /// running runtime (blue/green: queries keep being answered meanwhile),
    /// showing progress until the new generation is live.
    Rebuild {
        /// The projection to rebuild.
        projection: String,
        /// Start it and return at once.
        #[arg(long)]
        detach: bool,
        /// Cancel the rebuild in progress instead.
        #[arg(long, conflicts_with = "detach")]
        cancel: bool,
        /// Build it as a preview: beside the live one, following it, never
        /// switching by itself (see `refract preview`).
        #[arg(long, conflicts_with = "cancel")]
        preview: bool,
        /// The component to preview (default: the projection's plugin file on the server).
        #[arg(long, requires = "preview")]
        plugin: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// See what a preview (`refract rebuild <p> --preview`) changes against
    /// the live read model, then promote it (zero downtime) or discard it.
    Preview {
        projection: String,
        #[command(subcommand)]
        action: PreviewAction,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show the projections and enrichers of a running runtime: state, lag,
    /// throughput, dead letters and the last error, as a table.
    Status {
        /// Redraw every 2 seconds, with throughput, until interrupted.
        #[arg(long)]
        watch: bool,
        /// The instances of the cluster instead (`GET /v1/cluster`): who is
        /// live, where, and how far each of its projections is.
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List a projection's dead letters, or retry or skip them, on a running runtime.
    DeadLetters {
        projection: String,
        #[command(subcommand)]
        action: Option<DeadLetterAction>,
        #[command(flatten)]
        remote: Remote,
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
        Command::Run(args) => cli::serve::run(args.config()?, None),
        Command::Produce { stream, file, batch, remote } => cli::remote::produce(&stream, file, batch.max(1), &remote),
        Command::Rebuild { projection, detach, preview: true, plugin, remote, .. } => {
            cli::preview::start(&projection, plugin.as_deref(), &remote, detach)
        }
        Command::Rebuild { projection, detach, cancel, remote, .. } => {
            cli::remote::rebuild(&projection, &remote, detach, cancel)
        }
        Command::Preview { projection, action, remote } => cli::preview::preview(&projection, action, &remote),
        Command::Status { watch, cluster: false, remote } => cli::remote::status(&remote, watch),
        Command::Status { watch, cluster: true, remote } => cli::remote::cluster_status(&remote, watch),
        Command::DeadLetters { projection, action, remote } => cli::remote::dead_letters(&projection, action, &remote),
        Command::Plugin(command) => cli::plugin::plugin_command(command),
        Command::Demo { run, events } => cli::demo::run(run, events),
    }
}
