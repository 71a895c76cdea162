//! `keyfile`: the key-file parser (`GroupSecret::parse`, which `load`
//! runs on a file's text). Not network input, but a file an operator
//! copies around; a mangled copy must fail loudly, never yield another
//! key.
//!
//! Input: the file's bytes (invalid UTF-8 is replaced, as the parser only
//! takes text).
//!
//! Invariants: `parse` accepts exactly `"ela-fast-key-v1 "` followed by 64
//! lowercase hex digits, with only whitespace around it; then
//! `to_file_string()` is that line plus a newline and parses back to the
//! same fingerprint. Every error reads as one line.

use ela_dataplane::crypto::GroupSecret;

use crate::input::Writer;

const PREFIX: &str = "ela-fast-key-v1 ";

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check(&text);
}

fn check(s: &str) {
    let t = s.trim();
    let valid = t.len() == PREFIX.len() + 64
        && t.starts_with(PREFIX)
        && t.as_bytes()[PREFIX.len()..]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    match GroupSecret::parse(s) {
        Ok(g) => {
            assert!(valid, "accepted {s:?}");
            let f = g.to_file_string();
            assert_eq!(f, format!("{t}\n"), "written back differently");
            let again = GroupSecret::parse(&f).expect("its own file string");
            assert_eq!(again.fingerprint(), g.fingerprint());
            assert_eq!(again.to_file_string(), f);
        }
        Err(e) => {
            assert!(!valid, "refused {s:?}: {e}");
            let m = e.to_string();
            assert!(!m.is_empty() && !m.contains('\n'), "error message {m:?}");
        }
    }
}

/// Seeds: a good line, with CRLF and surrounding blanks, and the near
/// misses (uppercase, short, long, two spaces, a tab, other prefix, text
/// after, empty).
pub fn seeds() -> Vec<Vec<u8>> {
    let key = "0123456789abcdef".repeat(4);
    let good = format!("{PREFIX}{key}");
    [
        format!("{good}\n"),
        format!("  {good}\r\n\n"),
        format!("{PREFIX}{}", key.to_uppercase()),
        format!("{PREFIX}{}", &key[..63]),
        format!("{PREFIX}{key}0"),
        format!("ela-fast-key-v1  {key}"),
        format!("ela-fast-key-v1\t{key}"),
        format!("ela-fast-key-v2 {key}"),
        format!("{good} extra"),
        String::new(),
        " \n".to_string(),
    ]
    .into_iter()
    .map(|s| Writer::new().bytes(s.as_bytes()).done())
    .collect()
}
