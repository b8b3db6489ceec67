//! Names users choose (streams, projections, tables): one rule for all, so a
//! name is always safe in a URL, a file name and a redb table name.

/// Check that `name` is 1–128 characters of `A–Z a–z 0–9 . _ -`, not starting with `.`.
pub fn validate(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid {what} name {name:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ - (not starting with .)"))
    }
}
