//! The data directory's format, so that a Refract never misreads a data
//! directory written by another version.
//!
//! `<data-dir>/FORMAT` holds the format number. A directory without it was
//! written before formats were numbered, in format 1 (the layout has not
//! changed since: later tables are created when missing, generation 0 lives
//! in the projection's own directory); it opens, and gets the file. A
//! directory written in a newer format than this build reads is refused
//! before anything in it is opened or changed.

use std::path::Path;

/// The format this build writes, and the newest it reads.
pub const FORMAT: u32 = 1;

const FORMAT_FILE: &str = "FORMAT";

/// Check (and, for a new or unnumbered directory, record) the format of the data directory `dir`.
pub fn check(dir: &Path) -> anyhow::Result<()> {
    let file = dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let found: u32 = text.trim().parse().map_err(|_| {
                anyhow::anyhow!("{}: expected a data format number, found {:?}", file.display(), text.trim())
            })?;
            if found > FORMAT {
                anyhow::bail!(
                    "the data directory {} was written by a newer Refract (data format {found}); this one reads \
                     formats up to {FORMAT}: run the newer version, or point data-dir elsewhere",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            replace_durably(&file, format!("{FORMAT}\n").as_bytes())?;
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", file.display())),
    }
}

/// Replace `path` with `bytes` so that after a crash or a power cut it holds
/// either the old contents or the new ones, never an empty or partial file:
/// write a temporary file beside it, fsync it, rename it over, fsync the
/// directory.
pub fn replace_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_and_unnumbered_directories_get_the_format_and_newer_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("FORMAT")).unwrap(), "1\n");
        check(dir.path()).unwrap();
        std::fs::write(dir.path().join("FORMAT"), "2\n").unwrap();
        let refused = check(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("written by a newer Refract (data format 2)"), "{refused}");
        std::fs::write(dir.path().join("FORMAT"), "two").unwrap();
        assert!(check(dir.path()).unwrap_err().to_string().contains("expected a data format number"));
    }
}
