//! `refract rebuild <p> --preview [--plugin FILE]` and `refract preview <p>
//! diff | promote | discard`: try another version of a projection's plugin
//! beside the live one, see what it would change, then take it or leave it.

use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use refract::api::dto::{PreviewDiscarded, PreviewPromoted, RebuildStarted};
use refract::runtime::PreviewDiff;
use refract::store::diff::Change;

use super::remote::{Remote, body, error_message, follow};

#[derive(Subcommand)]
pub(crate) enum PreviewAction {
    /// Per table, the keys the preview adds, removes and changes against
    /// the live read model, with samples; per index, the documents in each.
    Diff {
        /// Keys shown of each kind per table.
        #[arg(long, default_value_t = 5)]
        samples: usize,
        /// Print the diff as JSON (the API's answer).
        #[arg(long)]
        json: bool,
    },
    /// Make the preview the live generation (the rebuild's switch: queries
    /// never stop) and its component the projection's plugin file; shows
    /// progress until it is live.
    Promote {
        /// Return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Stop the preview and delete what it built.
    Discard,
}

/// `refract rebuild <p> --preview`: start a preview with `plugin` (default:
/// the projection's plugin file on the server) and follow it until it has
/// caught up with the live generation.
pub(crate) fn start(projection: &str, plugin: Option<&Path>, remote: &Remote, detach: bool) -> anyhow::Result<()> {
    let component = match plugin {
        Some(file) => std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
        None => Vec::new(),
    };
    let client = remote.client();
    let path = format!("/v1/projections/{projection}/preview");
    let reply =
        client.post(&path, "application/wasm", &component).with_context(|| format!("reaching {}", remote.url))?;
    if reply.status >= 300 {
        anyhow::bail!("{} previewing: {}", reply.status, error_message(&reply));
    }
    let RebuildStarted { generation, .. } = body(reply)?;
    eprintln!("building {projection} generation {generation} as a preview, beside the live one");
    if detach {
        return Ok(());
    }
    follow(&client, projection, generation, true)?;
    eprintln!(
        "the preview has caught up and follows the live generation; see what it changes: refract preview {projection} diff\nthen: refract preview {projection} promote (or discard)"
    );
    Ok(())
}

pub(crate) fn preview(projection: &str, action: PreviewAction, remote: &Remote) -> anyhow::Result<()> {
    let client = remote.client();
    let reach = || format!("reaching {}", remote.url);
    match action {
        PreviewAction::Diff { samples, json } => {
            let reply = client
                .get(&format!("/v1/projections/{projection}/preview/diff?samples={samples}"))
                .with_context(reach)?;
            if reply.status != 200 {
                anyhow::bail!("{} comparing the preview: {}", reply.status, error_message(&reply));
            }
            if json {
                println!("{}", reply.body);
                return Ok(());
            }
            let diff: PreviewDiff = body(reply)?;
            print!("{}", render(&diff));
            Ok(())
        }
        PreviewAction::Promote { detach } => {
            let path = format!("/v1/projections/{projection}/preview/promote");
            let reply = client.post(&path, "application/json", b"").with_context(reach)?;
            if reply.status >= 300 {
                anyhow::bail!("{} promoting: {}", reply.status, error_message(&reply));
            }
            let PreviewPromoted { promoted, .. } = body(reply)?;
            eprintln!("promoting generation {promoted} of {projection}: it switches once it has caught up");
            if detach {
                return Ok(());
            }
            follow(&client, projection, promoted, false)
        }
        PreviewAction::Discard => {
            let reply = client.delete(&format!("/v1/projections/{projection}/preview")).with_context(reach)?;
            if reply.status >= 300 {
                anyhow::bail!("{} discarding: {}", reply.status, error_message(&reply));
            }
            let PreviewDiscarded { discarded, .. } = body(reply)?;
            eprintln!("discarded the preview of {projection} (generation {discarded}): nothing of it is left");
            Ok(())
        }
    }
}

/// The diff as a table of counts, then each table's samples.
fn render(diff: &PreviewDiff) -> String {
    let mut out = format!(
        "{}: preview generation {} ({}) against live generation {} ({}), {}\n\n",
        diff.projection,
        diff.generation,
        diff.preview_version,
        diff.live_generation,
        diff.live_version,
        match diff.caught_up {
            true => format!("caught up at {} events", diff.live_position),
            false => format!("still replaying: {} of {} events", diff.preview_position, diff.live_position),
        }
    );
    let width = diff.tables.iter().map(|t| t.table.len()).max().unwrap_or(5).max(5);
    out.push_str(&format!(
        "{:width$}  {:>9}  {:>9}  {:>9}  {:>9}\n",
        "table", "added", "removed", "changed", "unchanged"
    ));
    for t in &diff.tables {
        out.push_str(&format!(
            "{:width$}  {:>9}  {:>9}  {:>9}  {:>9}\n",
            t.table, t.added, t.removed, t.changed, t.unchanged
        ));
    }
    if !diff.indexes.is_empty() {
        out.push_str("\nindex documents: live → preview\n");
        for i in &diff.indexes {
            let n = |c: Option<u64>| c.map_or_else(|| "none".to_owned(), |c| c.to_string());
            out.push_str(&format!("  {}: {} → {}\n", i.index, n(i.live), n(i.preview)));
        }
    }
    for t in diff.tables.iter().filter(|t| !t.samples.is_empty()) {
        out.push_str(&format!("\n{}:\n", t.table));
        for s in &t.samples {
            let v = |v: &Option<serde_json::Value>| v.as_ref().map_or_else(|| "none".to_owned(), |v| v.to_string());
            let line = match s.change {
                Change::Added => format!("  + {}  {}", s.key, v(&s.preview)),
                Change::Removed => format!("  - {}  {}", s.key, v(&s.live)),
                Change::Changed => {
                    format!("  ~ {}\n      live:    {}\n      preview: {}", s.key, v(&s.live), v(&s.preview))
                }
            };
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}
