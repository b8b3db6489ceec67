//! The supply-chain check CI runs (`scripts/check-deps`) says something
//! about the change it checks: a known-vulnerable crate fails it, reading the
//! offline RustSec snapshot, and a newer wasmtime on the registry is a notice,
//! never a failure. Both need crates.io, to resolve their scratch lock files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// The two tests share cargo-deny's database directory, which a run may replace.
static DATABASE: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn run(dir: &Path, program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// `scripts/check-deps` of the repository at `root`, on `manifest`, finding
/// the shared folder (the offline advisory database) where this repository's is.
fn check_deps(root: &Path, manifest: Option<&Path>) -> (bool, String) {
    let shared = run(&repo(), "scripts/shared-dir", &[]);
    let mut command = Command::new(root.join("scripts/check-deps"));
    command.args(manifest).current_dir(root).env_remove("CARGO_TARGET_DIR");
    if !shared.stdout.is_empty() {
        command.env("REFRACT_SHARED_DIR", String::from_utf8(shared.stdout).unwrap().trim());
    }
    let out = command.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_known_vulnerable_crate_fails_the_advisory_check() {
    let _database = DATABASE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(
        dir.path().join("Cargo.toml"),
        "[package]\nname = \"scratch\"\nversion = \"0.1.0\"\nedition = \"2021\"\nlicense = \"MIT\"\npublish = false\n\n\
         [dependencies]\nsmallvec = \"=1.6.0\"\n\n[workspace]\n",
    )
    .unwrap();
    run(dir.path(), "cargo", &["generate-lockfile", "--quiet"]);

    let (passed, stderr) = check_deps(&repo(), Some(&dir.path().join("Cargo.toml")));
    assert!(!passed, "smallvec 1.6.0 passed the advisory check:\n{stderr}");
    assert!(stderr.contains("RUSTSEC-2021-0003"), "{stderr}");
    assert!(stderr.contains("advisories: RustSec database of "), "the database's date is printed:\n{stderr}");
}

#[test]
fn a_newer_wasmtime_on_the_registry_is_a_notice_not_a_failure() {
    let _database = DATABASE.lock().unwrap_or_else(|e| e.into_inner());
    // A copy of the workspace (tracked and new files) whose lock pins an older patch release.
    let scratch = tempfile::tempdir().unwrap();
    let files = run(&repo(), "git", &["ls-files", "-z", "--cached", "--others", "--exclude-standard"]);
    for file in files.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let file = Path::new(std::str::from_utf8(file).unwrap());
        let (from, to) = (repo().join(file), scratch.path().join(file));
        if from.is_file() {
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let manifest = scratch.path().join("Cargo.toml");
    let original = std::fs::read_to_string(&manifest).unwrap();
    let pinned = original.replace("wasmtime = { version = \"48\"", "wasmtime = { version = \"=48.0.8\"");
    assert_ne!(pinned, original, "the workspace's wasmtime requirement moved: update this test");
    std::fs::write(&manifest, pinned).unwrap();
    run(scratch.path(), "cargo", &["update", "--quiet", "-p", "wasmtime"]);
    std::fs::write(&manifest, original).unwrap();

    let (passed, stderr) = check_deps(scratch.path(), None);
    assert!(passed, "an older wasmtime failed the check:\n{stderr}");
    assert!(stderr.contains("notice: a newer wasmtime builds with Rust"), "{stderr}");
    assert!(stderr.contains("wasmtime v48.0.8 ->"), "{stderr}");
}
