//! `refract plugin new | build | check`: writing plugins in Rust, Python and
//! JavaScript.
//!
//! The binary carries what a plugin build needs besides the language's own
//! tool — the WIT package and the SDKs — and writes them into the plugin's
//! `.refract/` directory (`new` creates it, `build` refreshes it), so a
//! plugin always builds against the runtime that will run it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

use refract::plugin::Kind;
use refract::plugin::wasm::{PluginLimits, WasmPlugin};

/// A plugin's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Lang {
    Rust,
    Python,
    Js,
}

/// The WIT package, a file per group of interfaces (see `wit/README.md`).
const WIT: [(&str, &str); 8] = [
    ("wit/README.md", include_str!("../../../wit/README.md")),
    ("wit/types.wit", include_str!("../../../wit/types.wit")),
    ("wit/kv.wit", include_str!("../../../wit/kv.wit")),
    ("wit/search.wit", include_str!("../../../wit/search.wit")),
    ("wit/emit.wit", include_str!("../../../wit/emit.wit")),
    ("wit/lookup.wit", include_str!("../../../wit/lookup.wit")),
    ("wit/settings.wit", include_str!("../../../wit/settings.wit")),
    ("wit/worlds.wit", include_str!("../../../wit/worlds.wit")),
];

/// The workspace's root manifest: the one place where the SDK's dependency
/// versions (and the template's) are declared.
const ROOT_MANIFEST: &str = include_str!("../../../Cargo.toml");

/// The `key = value` lines of `section` in `manifest` (one-line values only,
/// as the root manifest writes them).
fn entries<'a>(manifest: &'a str, section: &str) -> Vec<(&'a str, &'a str)> {
    let header = format!("[{section}]");
    let mut lines = manifest.lines().skip_while(|l| l.trim() != header).skip(1);
    let mut out = Vec::new();
    for line in lines.by_ref() {
        let line = line.trim();
        if line.starts_with('[') {
            break;
        }
        if let Some((key, value)) = line.split_once(" = ").filter(|_| !line.starts_with('#')) {
            out.push((key.trim(), value.trim()));
        }
    }
    out
}

/// The root's specification of dependency `name`, with `extra` keys (e.g.
/// `optional = true`) added.
fn dependency(name: &str, extra: &str) -> String {
    let spec = entries(ROOT_MANIFEST, "workspace.dependencies")
        .into_iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("the root manifest declares {name}"));
    let inner = match spec.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        Some(table) => table.trim().to_owned(),
        None => format!("version = {spec}"),
    };
    match extra.trim() {
        "" => format!("{{ {inner} }}"),
        extra => format!("{{ {inner}, {extra} }}"),
    }
}

/// Workspace member `manifest` made to stand alone (in a plugin's
/// `.refract/`): each `workspace = true` replaced by what the root declares,
/// path dependencies pointed at `paths` (name → path), lints dropped.
fn standalone(manifest: &str, paths: &[(&str, &str)]) -> String {
    let package = entries(ROOT_MANIFEST, "workspace.package");
    let mut out = String::new();
    let mut section = String::new();
    for line in manifest.lines() {
        if line.starts_with('[') {
            section = line.to_owned();
        }
        if section == "[lints]" {
            continue;
        }
        let rewritten = match line.split_once(" = ") {
            Some((key, "true")) if key.ends_with(".workspace") => {
                let name = key.trim_end_matches(".workspace");
                match (section.as_str(), paths.iter().find(|(n, _)| *n == name)) {
                    ("[package]", _) => {
                        let value = package.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
                        format!("{name} = {}", value.unwrap_or_else(|| panic!("the root manifest sets package.{name}")))
                    }
                    (_, Some((_, path))) => format!("{name} = {{ path = \"{path}\" }}"),
                    _ => format!("{name} = {}", dependency(name, "")),
                }
            }
            Some((name, table)) if table.starts_with("{ workspace = true") => {
                let extra = table.trim_start_matches("{ workspace = true").trim_end_matches('}');
                format!("{name} = {}", dependency(name, extra.trim_start_matches(',')))
            }
            _ => line.to_owned(),
        };
        out.push_str(&rewritten);
        out.push('\n');
    }
    out.trim_end().to_owned() + "\n"
}

/// The Rust SDK's manifest and the packed encoding's, standing alone.
fn rust_sdk_manifests() -> [(&'static str, String); 2] {
    [
        ("sdk/rust/Cargo.toml", standalone(include_str!("../../../sdk/rust/Cargo.toml"), &[("refract-abi", "../abi")])),
        ("sdk/abi/Cargo.toml", standalone(include_str!("../../../abi/Cargo.toml"), &[])),
    ]
}

/// (path under `.refract/`, contents) per language.
fn sdk_files(lang: Lang) -> Vec<(&'static str, std::borrow::Cow<'static, str>)> {
    let mut files: Vec<(&str, &str)> = WIT.to_vec();
    files.extend(match lang {
        Lang::Rust => vec![
            ("sdk/abi/src/lib.rs", include_str!("../../../abi/src/lib.rs")),
            ("sdk/rust/src/cache.rs", include_str!("../../../sdk/rust/src/cache.rs")),
            ("sdk/rust/src/emit.rs", include_str!("../../../sdk/rust/src/emit.rs")),
            ("sdk/rust/src/enricher.rs", include_str!("../../../sdk/rust/src/enricher.rs")),
            ("sdk/rust/src/event.rs", include_str!("../../../sdk/rust/src/event.rs")),
            ("sdk/rust/src/export.rs", include_str!("../../../sdk/rust/src/export.rs")),
            ("sdk/rust/src/host.rs", include_str!("../../../sdk/rust/src/host.rs")),
            ("sdk/rust/src/kv.rs", include_str!("../../../sdk/rust/src/kv.rs")),
            ("sdk/rust/src/lib.rs", include_str!("../../../sdk/rust/src/lib.rs")),
            ("sdk/rust/src/lookup.rs", include_str!("../../../sdk/rust/src/lookup.rs")),
            ("sdk/rust/src/manifest.rs", include_str!("../../../sdk/rust/src/manifest.rs")),
            ("sdk/rust/src/native.rs", include_str!("../../../sdk/rust/src/native.rs")),
            ("sdk/rust/src/packed.rs", include_str!("../../../sdk/rust/src/packed.rs")),
            ("sdk/rust/src/projection.rs", include_str!("../../../sdk/rust/src/projection.rs")),
            ("sdk/rust/src/search.rs", include_str!("../../../sdk/rust/src/search.rs")),
            ("sdk/rust/src/settings.rs", include_str!("../../../sdk/rust/src/settings.rs")),
            ("sdk/rust/src/small_alloc.rs", include_str!("../../../sdk/rust/src/small_alloc.rs")),
            ("sdk/rust/src/table.rs", include_str!("../../../sdk/rust/src/table.rs")),
            ("sdk/rust/src/testing.rs", include_str!("../../../sdk/rust/src/testing.rs")),
        ],
        Lang::Python => vec![
            ("sdk/python/refract_sdk/__init__.py", include_str!("../../../sdk/python/refract_sdk/__init__.py")),
            ("sdk/python/refract_testing.py", include_str!("../../../sdk/python/refract_testing.py")),
        ],
        Lang::Js => vec![
            ("sdk/js/refract-sdk.js", include_str!("../../../sdk/js/refract-sdk.js")),
            ("sdk/js/refract-sdk.d.ts", include_str!("../../../sdk/js/refract-sdk.d.ts")),
            ("sdk/js/build.mjs", include_str!("../../../sdk/js/build.mjs")),
            ("sdk/js/testing.mjs", include_str!("../../../sdk/js/testing.mjs")),
            ("sdk/js/hooks.mjs", include_str!("../../../sdk/js/hooks.mjs")),
            ("sdk/js/memory.mjs", include_str!("../../../sdk/js/memory.mjs")),
            ("sdk/js/host/kv.mjs", include_str!("../../../sdk/js/host/kv.mjs")),
            ("sdk/js/host/search.mjs", include_str!("../../../sdk/js/host/search.mjs")),
            ("sdk/js/host/emit.mjs", include_str!("../../../sdk/js/host/emit.mjs")),
            ("sdk/js/host/lookup.mjs", include_str!("../../../sdk/js/host/lookup.mjs")),
            ("sdk/js/host/settings.mjs", include_str!("../../../sdk/js/host/settings.mjs")),
            ("sdk/js/host/log.mjs", include_str!("../../../sdk/js/host/log.mjs")),
        ],
    });
    let mut files: Vec<_> = files.into_iter().map(|(path, text)| (path, std::borrow::Cow::Borrowed(text))).collect();
    if lang == Lang::Rust {
        files.extend(rust_sdk_manifests().map(|(path, text)| (path, std::borrow::Cow::Owned(text))));
    }
    files
}

/// (file name, template) of a new plugin: its source and unit test, and
/// the events and expectation `refract plugin test` runs.
fn template(lang: Lang, kind: Kind) -> Vec<(&'static str, &'static str)> {
    let mut files = vec![(
        "expected.json",
        match kind {
            Kind::Projection => include_str!("../../../sdk/templates/expected-projection.json"),
            Kind::Enricher => include_str!("../../../sdk/templates/expected-enricher.json"),
        },
    )];
    files.push(("events.ndjson", include_str!("../../../sdk/templates/events.ndjson")));
    files.extend(source_template(lang, kind));
    files
}

/// (file name, template) of a new plugin's source and unit test.
fn source_template(lang: Lang, kind: Kind) -> Vec<(&'static str, &'static str)> {
    match (lang, kind) {
        (Lang::Rust, Kind::Projection) => vec![
            ("Cargo.toml", include_str!("../../../sdk/templates/rust/Cargo.toml")),
            ("src/lib.rs", include_str!("../../../sdk/templates/rust/projection.rs")),
        ],
        (Lang::Rust, Kind::Enricher) => vec![
            ("Cargo.toml", include_str!("../../../sdk/templates/rust/Cargo.toml")),
            ("src/lib.rs", include_str!("../../../sdk/templates/rust/enricher.rs")),
        ],
        (Lang::Python, Kind::Projection) => vec![
            ("app.py", include_str!("../../../sdk/templates/python/projection.py")),
            ("test_app.py", include_str!("../../../sdk/templates/python/test_projection.py")),
        ],
        (Lang::Python, Kind::Enricher) => vec![
            ("app.py", include_str!("../../../sdk/templates/python/enricher.py")),
            ("test_app.py", include_str!("../../../sdk/templates/python/test_enricher.py")),
        ],
        (Lang::Js, Kind::Projection) => vec![
            ("app.js", include_str!("../../../sdk/templates/js/projection.js")),
            ("app.test.js", include_str!("../../../sdk/templates/js/projection.test.js")),
        ],
        (Lang::Js, Kind::Enricher) => vec![
            ("app.js", include_str!("../../../sdk/templates/js/enricher.js")),
            ("app.test.js", include_str!("../../../sdk/templates/js/enricher.test.js")),
        ],
    }
}

/// How to build and test a plugin of `lang`, for its README and `new`'s output.
fn commands(lang: Lang) -> (&'static str, &'static str) {
    match lang {
        Lang::Rust => ("refract plugin build", "cargo test"),
        Lang::Python => ("refract plugin build", "PYTHONPATH=.refract/sdk/python python3 -m unittest"),
        Lang::Js => ("refract plugin build", "node --import ./.refract/sdk/js/testing.mjs --test"),
    }
}

/// Write (or refresh) `dir/.refract/`: the WIT package and `lang`'s SDK.
pub(crate) fn write_sdk(dir: &Path, lang: Lang) -> anyhow::Result<()> {
    // Replace, not overwrite: a file an older Refract wrote and this one no
    // longer does (the WIT package was one `plugin.wit`) would otherwise
    // stay and clash with its successors.
    for stale in ["wit", "sdk"] {
        let path = dir.join(".refract").join(stale);
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    }
    for (path, contents) in sdk_files(lang) {
        let path = dir.join(".refract").join(path);
        std::fs::create_dir_all(path.parent().expect("a file under .refract"))?;
        std::fs::write(&path, contents.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `refract plugin new`: a plugin called `name` in `parent/name`, ready to build and test.
pub(crate) fn new(parent: &Path, name: &str, lang: Lang, kind: Kind) -> anyhow::Result<PathBuf> {
    refract::names::validate("plugin", name).map_err(anyhow::Error::msg)?;
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    for (file, text) in template(lang, kind) {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("a file in the plugin"))?;
        let text = text
            .replace("{{name}}", name)
            .replace("{{serde}}", &dependency("serde", ""))
            .replace("{{serde_json}}", &dependency("serde_json", ""));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let (build, test) = commands(lang);
    let kind_name = match kind {
        Kind::Projection => "projection",
        Kind::Enricher => "enricher",
    };
    let readme = format!(
        "# {name}\n\nA Refract {kind_name} ({lang:?}).\n\n```sh\n{build}      # → {file}\nrefract plugin test       # events.ndjson through {file}, checked against expected.json\n{test}\nrefract plugin check {file}\ncp {file} <plugins-dir>/   # a running runtime picks it up within a second\n```\n\n`refract plugin test` runs the component in the real engine on a scratch\nread model and prints what each event read and wrote; `--json` prints it\nas JSON lines (its last line's `final` is an `expected.json`), `--quiet`\nonly the outcome. Add events to `events.ndjson` (one per line, as\nappended) and what they must build to `expected.json`.\n\n`.refract/` holds the WIT package and the SDK this plugin builds against;\n`refract plugin build` refreshes it from the runtime.\n",
        file = output_name(&dir),
    );
    std::fs::write(dir.join("README.md"), readme)?;
    std::fs::write(dir.join(".gitignore"), ".refract/\n*.wasm\ntarget/\n__pycache__/\n")?;
    write_sdk(&dir, lang)?;
    Ok(dir)
}

/// The language of the plugin in `dir`, by its files.
pub(crate) fn detect(dir: &Path) -> anyhow::Result<Lang> {
    if dir.join("Cargo.toml").is_file() {
        Ok(Lang::Rust)
    } else if dir.join("app.py").is_file() {
        Ok(Lang::Python)
    } else if dir.join("app.js").is_file() {
        Ok(Lang::Js)
    } else {
        bail!("{} holds no plugin: expected Cargo.toml (Rust), app.py (Python) or app.js (JavaScript)", dir.display())
    }
}

/// The component file `build` writes by default: `<dir>/<name with _>.wasm`.
pub(crate) fn output_name(dir: &Path) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().replace('-', "_")).unwrap_or_else(|| "plugin".into());
    format!("{name}.wasm")
}

/// Whether the Python or JavaScript source in `dir` is an enricher.
fn source_kind(dir: &Path, lang: Lang) -> anyhow::Result<Kind> {
    let (file, marker) = match lang {
        Lang::Python => ("app.py", "(Enricher)"),
        Lang::Js => ("app.js", "enricher("),
        Lang::Rust => return Ok(Kind::Projection),
    };
    let source = std::fs::read_to_string(dir.join(file))?;
    Ok(if source.contains(marker) { Kind::Enricher } else { Kind::Projection })
}

fn world(kind: Kind) -> &'static str {
    match kind {
        Kind::Projection => "refract:plugin/search-projection",
        Kind::Enricher => "refract:plugin/enricher",
    }
}

/// The first of `candidates` that runs with `--version`.
fn find_tool(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success())).cloned()
}

fn cache_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".cache").join("refract")
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// `refract plugin build`: build the plugin in `dir` into a component with
/// its language's tool; returns the component's path.
pub(crate) fn build(dir: &Path, out: Option<PathBuf>, kind: Option<Kind>) -> anyhow::Result<PathBuf> {
    let lang = detect(dir)?;
    let dir = dir.canonicalize().with_context(|| format!("reading {}", dir.display()))?;
    let out = match out {
        Some(out) => std::path::absolute(out)?,
        None => dir.join(output_name(&dir)),
    };
    let started = Instant::now();
    match lang {
        Lang::Rust => build_rust(&dir, &out)?,
        Lang::Python => {
            write_sdk(&dir, lang)?;
            let kind = kind.map_or_else(|| source_kind(&dir, lang), Ok)?;
            let mut candidates = vec![PathBuf::from("componentize-py")];
            if let Some(tool) = std::env::var_os("REFRACT_COMPONENTIZE_PY") {
                candidates.insert(0, tool.into());
            }
            candidates.push(cache_dir().join("py").join("bin").join("componentize-py"));
            let Some(tool) = find_tool(&candidates) else {
                bail!(
                    "componentize-py is not installed: `pip install componentize-py==0.25.1` \
                     (or `python3 -m venv ~/.cache/refract/py && ~/.cache/refract/py/bin/pip install componentize-py==0.25.1`)"
                );
            };
            eprintln!("building {} with {} ({}) …", dir.display(), tool.display(), world(kind));
            // The sources as files: componentize-py skips linked modules
            // (like a module shared between plugins).
            let sources = dir.join(".refract/build");
            let _ = std::fs::remove_dir_all(&sources);
            copy_sources(&dir, &sources)?;
            run(
                Command::new(&tool)
                    .current_dir(&dir)
                    .arg("-d")
                    .arg(".refract/wit")
                    .arg("-w")
                    .arg(world(kind))
                    .arg("componentize")
                    .arg("app")
                    .args(["-p", ".refract/build", "-p", ".refract/sdk/python", "-o"])
                    .arg(&out),
                "componentize-py",
            )?;
        }
        Lang::Js => {
            write_sdk(&dir, lang)?;
            let kind = kind.map_or_else(|| source_kind(&dir, lang), Ok)?;
            let Some(node) = find_tool(&[PathBuf::from("node")]) else {
                bail!("Node.js is not installed: install node (≥ 20) and npm");
            };
            let toolchain =
                std::env::var_os("REFRACT_JS_TOOLCHAIN").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("js"));
            if !toolchain.join("node_modules/@bytecodealliance/componentize-js").is_dir() {
                bail!(
                    "componentize-js is not installed in {0}: `npm install --prefix {0} @bytecodealliance/componentize-js@0.23.0` \
                     (or set REFRACT_JS_TOOLCHAIN to a directory where it is)",
                    toolchain.display()
                );
            }
            eprintln!("building {} with componentize-js ({}) …", dir.display(), world(kind));
            run(
                Command::new(node)
                    .current_dir(&dir)
                    .env("REFRACT_JS_TOOLCHAIN", &toolchain)
                    .arg(".refract/sdk/js/build.mjs")
                    .arg(".")
                    .arg(".refract/wit")
                    .arg(world(kind))
                    .arg(&out),
                "componentize-js",
            )?;
        }
    }
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    eprintln!("built {} ({size:.1} MB) in {:.1} s", out.display(), started.elapsed().as_secs_f64());
    Ok(out)
}

/// Copy the source files under `from` to `to`, following links, leaving out
/// hidden entries, `__pycache__` and built components.
fn copy_sources(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let name = path.file_name().expect("a directory entry has a name").to_string_lossy().into_owned();
        if name.starts_with('.') || name == "__pycache__" || name.ends_with(".wasm") {
            continue;
        }
        if path.is_dir() {
            copy_sources(&path, &to.join(&name))?;
        } else {
            std::fs::copy(&path, to.join(&name)).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

fn build_rust(dir: &Path, out: &Path) -> anyhow::Result<()> {
    if dir.join(".refract/sdk/rust").is_dir() {
        write_sdk(dir, Lang::Rust)?; // a plugin `new` made: refresh its SDK
    }
    if let Some(rustup) = find_tool(&[PathBuf::from("rustup")]) {
        let installed = Command::new(rustup).args(["target", "list", "--installed"]).output()?;
        if !String::from_utf8_lossy(&installed.stdout).lines().any(|t| t.trim() == "wasm32-wasip2") {
            bail!("the wasm32-wasip2 target is not installed: `rustup target add wasm32-wasip2`");
        }
    }
    eprintln!("building {} with cargo (wasm32-wasip2) …", dir.display());
    let mut child = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(dir)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo (is Rust installed? https://rustup.rs)")?;
    let mut artifact = None;
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let message: serde_json::Value = serde_json::from_str(&line?).unwrap_or_default();
        if message["reason"] == "compiler-artifact" {
            let files = message["filenames"].as_array().cloned().unwrap_or_default();
            if let Some(wasm) = files.iter().filter_map(|f| f.as_str()).find(|f| f.ends_with(".wasm")) {
                artifact = Some(PathBuf::from(wasm));
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let artifact = artifact.context("cargo built no .wasm: is the crate a `cdylib`?")?;
    std::fs::copy(&artifact, out).with_context(|| format!("copying {} to {}", artifact.display(), out.display()))?;
    Ok(())
}

/// What `check` found in a component.
pub(crate) struct Checked {
    pub kind: Kind,
    /// Whether it takes its batches packed into one buffer (the `packed-*` worlds).
    pub packed: bool,
    pub manifest: refract::plugin::Manifest,
    pub indexes: Vec<refract::plugin::IndexMapping>,
    /// The tables it declares keyed like its events (WIT 0.1.1).
    pub keyed_tables: Vec<refract::plugin::KeyedTable>,
}

/// `refract plugin check`: compile `file`, instantiate it against the host's
/// interfaces and ask for its manifest, as the runtime would.
pub(crate) fn check(file: &Path) -> anyhow::Result<Checked> {
    use refract::plugin::Handler;
    let plugin = load(file)?;
    Ok(Checked {
        kind: plugin.kind(),
        packed: plugin.takes_packed_batches(),
        manifest: plugin.manifest().clone(),
        indexes: plugin.indexes().to_vec(),
        keyed_tables: plugin.keyed_tables().to_vec(),
    })
}

/// Compile the component in `file` and load it as the runtime would (its
/// manifest, indexes and keyed tables checked), with the default limits.
pub(crate) fn load(file: &Path) -> anyhow::Result<WasmPlugin> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let engine = refract::plugin::engine::new_engine().map_err(|e| anyhow::anyhow!("creating the engine: {e}"))?;
    if bytes.len() > 4 << 20 {
        eprintln!("compiling {} ({:.1} MB) …", file.display(), bytes.len() as f64 / 1048576.0);
    }
    let component = wasmtime::component::Component::new(&engine, &bytes)
        .map_err(|e| anyhow::anyhow!("{} does not compile as a component: {e:#}", file.display()))?;
    let linker = refract::plugin::wasm::linker(&engine).map_err(|e| anyhow::anyhow!("{e}"))?;
    let plugin = WasmPlugin::load(&engine, &linker, &component, &file.display().to_string(), PluginLimits::default())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    refract::plugin::declared(&plugin).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(plugin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refreshing a plugin's `.refract/` drops what an older Refract wrote
    /// there: the WIT package was one `plugin.wit`, which would clash with
    /// the files that replaced it.
    #[test]
    fn refreshing_the_sdk_removes_files_an_older_refract_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".refract/wit/plugin.wit");
        std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
        std::fs::write(&stale, "package refract:plugin@0.1.0;").unwrap();
        write_sdk(dir.path(), Lang::Python).unwrap();
        assert!(!stale.exists());
        assert!(dir.path().join(".refract/wit/types.wit").exists());
        assert!(dir.path().join(".refract/sdk/python/refract_sdk/__init__.py").exists());
    }

    /// A Rust plugin gets the whole SDK: every source file of `sdk/rust/src`.
    #[test]
    fn the_scaffolded_rust_sdk_is_every_source_file_of_the_sdk() {
        let on_disk = listing("sdk/rust/src");
        let mut embedded: Vec<String> = sdk_files(Lang::Rust)
            .into_iter()
            .map(|(p, _)| p.to_owned())
            .filter(|p| p.starts_with("sdk/rust/src/"))
            .collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
    }

    /// The files of `dir` (relative to the workspace root), as `dir/<name>`, sorted.
    fn listing(dir: &str) -> Vec<String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| format!("{dir}/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        names.sort();
        names
    }

    /// A plugin gets the whole WIT package: every file of `wit/`.
    #[test]
    fn the_scaffolded_wit_package_is_every_file_of_wit() {
        let on_disk = listing("wit");
        let mut embedded: Vec<String> = WIT.iter().map(|(path, _)| (*path).to_owned()).collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
    }

    /// The SDK a plugin gets declares the same dependencies as Refract's own
    /// workspace, written out, with nothing left that needs the workspace.
    #[test]
    fn the_scaffolded_sdk_manifests_stand_alone_with_the_workspace_versions() {
        let [(_, sdk), (_, abi)] = rust_sdk_manifests();
        for manifest in [&sdk, &abi] {
            assert!(!manifest.contains("workspace"), "{manifest}");
            assert!(!manifest.contains("[lints]"), "{manifest}");
            let edition = entries(ROOT_MANIFEST, "workspace.package").into_iter().find(|(k, _)| *k == "edition");
            assert!(manifest.contains(&format!("edition = {}", edition.expect("the root sets an edition").1)));
        }
        assert!(sdk.contains("refract-abi = { path = \"../abi\" }"), "{sdk}");
        assert!(sdk.contains(&format!("serde = {}", dependency("serde", ""))), "{sdk}");
        // A workspace dependency with keys of its own keeps them.
        let talc = sdk.lines().find(|l| l.starts_with("talc = {")).expect("the talc dependency");
        assert!(talc.contains("optional = true") && talc.contains("version = \"5\""), "{talc}");
        assert_eq!(
            dependency("serde_json", ""),
            "{ version = \"1\", features = [\"raw_value\", \"float_roundtrip\"] }"
        );
        assert_eq!(
            dependency("rand_core", "optional = true"),
            "{ version = \"0.10\", default-features = false, optional = true }"
        );
    }
}
