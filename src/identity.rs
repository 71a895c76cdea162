//! The identity commands (`ca init|sign|revoke`, `node-key`, `cert show`):
//! reading and writing the files of `ela_control::identity`.
//!
//! Files are only ever created, never replaced: an existing path is an
//! error, and private keys are created with mode 0600 from the start
//! (`O_EXCL`, so a planted symlink is refused too).

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use ela_control::identity::{hex32, CaKey, CaPub, Cert, NodeKey, NodePubFile, Revocation};
use serde_json::json;

use crate::cli::{CaCmd, CertCmd};

/// Certificates start this long before they are signed, so that a node
/// whose clock is a little behind the CA's accepts a fresh one.
pub(crate) const BACKDATE_SECS: u64 = 300;
pub(crate) const DAY_SECS: u64 = 86_400;

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC` (the civil
/// calendar from a day count, after Howard Hinnant's `civil_from_days`).
pub fn utc(secs: u64) -> String {
    let days = (secs / DAY_SECS) as i64;
    let rem = secs % DAY_SECS;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `ca.key` → `ca.pub`; any other name gets `.pub` appended.
pub fn pub_path(key: &Path) -> PathBuf {
    if key.extension().is_some_and(|e| e == "key") {
        key.with_extension("pub")
    } else {
        let mut s = key.as_os_str().to_owned();
        s.push(".pub");
        PathBuf::from(s)
    }
}

/// Creates `path` with `contents` and `mode`; never replaces anything.
fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                anyhow::anyhow!("{} already exists (not replaced)", path.display())
            }
            _ => anyhow::Error::from(e).context(format!("creating {}", path.display())),
        })?;
    let res = f.write_all(contents.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = res {
        drop(f);
        // Ours, and half-written: a later attempt would only hit "exists".
        let _ = fs::remove_file(path);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// Writes a private key file and its public file beside it, or neither.
fn write_pair(key_path: &Path, key: &str, public: &str) -> anyhow::Result<PathBuf> {
    let pub_file = pub_path(key_path);
    for p in [key_path, &pub_file] {
        if p.symlink_metadata().is_ok() {
            bail!("{} already exists (not replaced)", p.display());
        }
    }
    write_new(key_path, key, 0o600)?;
    if let Err(e) = write_new(&pub_file, public, 0o644) {
        // We just created the key file: take it back rather than leave a
        // key without its public half.
        let _ = fs::remove_file(key_path);
        return Err(e);
    }
    Ok(pub_file)
}

/// Identity files are one short line; anything larger is not one.
const MAX_FILE: u64 = 64 << 10;

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE + 1).read_to_end(&mut bytes))
        .with_context(|| format!("reading {what} {}", path.display()))?;
    if bytes.len() as u64 > MAX_FILE {
        bail!(
            "{what} {} is larger than {MAX_FILE} bytes: not an identity file",
            path.display()
        );
    }
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{what} {} is not text", path.display()))
}

/// Warns if others may read the private key file at `path` (called once
/// it parsed as one).
fn warn_if_readable(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: {what} {} can be read by others (mode {mode:o}); chmod 600 it",
                path.display()
            );
        }
    }
}

pub fn load_ca_key(path: &Path) -> anyhow::Result<CaKey> {
    let k = CaKey::parse(&read(path, "CA key")?)
        .with_context(|| format!("CA key {}", path.display()))?;
    warn_if_readable(path, "CA key");
    Ok(k)
}

pub fn load_ca_pub(path: &Path) -> anyhow::Result<CaPub> {
    CaPub::parse(&read(path, "CA public key")?)
        .with_context(|| format!("CA public key {}", path.display()))
}

pub fn load_node_key(path: &Path) -> anyhow::Result<NodeKey> {
    let k = NodeKey::parse(&read(path, "node key")?)
        .with_context(|| format!("node key {}", path.display()))?;
    warn_if_readable(path, "node key");
    Ok(k)
}

pub fn load_cert(path: &Path) -> anyhow::Result<Cert> {
    Cert::parse(&read(path, "certificate")?)
        .with_context(|| format!("certificate {}", path.display()))
}

pub fn load_revocation(path: &Path) -> anyhow::Result<ela_control::identity::Revocation> {
    ela_control::identity::Revocation::parse(&read(path, "revocation")?)
        .with_context(|| format!("revocation {}", path.display()))
}

pub fn node_key(out: &Path) -> anyhow::Result<()> {
    let key = NodeKey::generate(&mut rand::rngs::OsRng);
    let public = key.public_file();
    let p = write_pair(out, &key.to_file_string(), &public.to_file_string())?;
    println!(
        "wrote the node key to {} (keep it on this node) and its public key to {}",
        out.display(),
        p.display()
    );
    Ok(())
}

pub fn ca(cmd: &CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Init { out } => {
            let key = CaKey::generate(&mut rand::rngs::OsRng);
            let p = write_pair(out, &key.to_file_string(), &key.public().to_file_string())?;
            println!(
                "wrote the authority key to {} (keep it offline) and its public key to {} (give it to every node); CA {}",
                out.display(),
                p.display(),
                hex32(&key.public().to_bytes())
            );
            Ok(())
        }
        CaCmd::Sign {
            ca,
            node_pub,
            name,
            addr,
            valid,
            out,
        } => {
            let key = load_ca_key(ca)?;
            let node = NodePubFile::parse(&read(node_pub, "node public key")?)
                .with_context(|| format!("node public key {}", node_pub.display()))?
                .public;
            let now = unix_now();
            let cert = key.sign(
                &node,
                name,
                *addr,
                now.saturating_sub(BACKDATE_SECS),
                now + valid * DAY_SECS,
            )?;
            write_new(out, &cert.to_file_string(), 0o644)?;
            println!(
                "wrote the certificate of {name} to {} (fingerprint {}, expires {})",
                out.display(),
                hex32(&cert.fingerprint()),
                utc(cert.body().not_after)
            );
            Ok(())
        }
        CaCmd::Revoke {
            ca,
            cert,
            fingerprint,
            out,
        } => {
            let key = load_ca_key(ca)?;
            let fp = match (cert, fingerprint) {
                (Some(path), None) => {
                    let c = load_cert(path)?;
                    if c.body().ca != key.public().to_bytes() {
                        bail!(
                            "certificate {} was signed by another authority: this CA cannot revoke it",
                            path.display()
                        );
                    }
                    c.fingerprint()
                }
                (None, Some(hex)) => parse_fingerprint(hex)?,
                _ => bail!("give exactly one of --cert and --fingerprint"),
            };
            let rev = key.revoke(fp, unix_now());
            write_new(out, &rev.to_file_string(), 0o644)?;
            println!(
                "wrote the revocation of {} to {}",
                hex32(&fp),
                out.display()
            );
            Ok(())
        }
    }
}

fn parse_fingerprint(s: &str) -> anyhow::Result<[u8; 32]> {
    let s = s.trim();
    let b = hex::decode(s)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok());
    b.ok_or_else(|| {
        anyhow::anyhow!(
            "--fingerprint must be 64 hex digits (a certificate's fingerprint), got {s:?}"
        )
    })
}

pub fn cert(cmd: &CertCmd) -> anyhow::Result<()> {
    let CertCmd::Show { file, ca, json } = cmd;
    let text = read(file, "file")?;
    let ca = ca.as_deref().map(load_ca_pub).transpose()?;
    let now = unix_now();
    let mut refused = None;
    let v = if text.starts_with(Revocation::KIND) {
        let r =
            Revocation::parse(&text).with_context(|| format!("revocation {}", file.display()))?;
        let status = ca.map(|ca| r.verify(&ca).map(|()| "valid".to_string()));
        if let Some(Err(e)) = &status {
            refused = Some(e.to_string());
        }
        json!({
            "kind": "revocation",
            "ca": hex32(&r.ca),
            "fingerprint": hex32(&r.fingerprint),
            "revoked_at": r.revoked_at,
            "verified": status.map(|s| s.unwrap_or_else(|e| e.to_string())),
        })
    } else {
        let c = Cert::parse(&text).with_context(|| format!("certificate {}", file.display()))?;
        let b = c.body();
        let status = ca.map(|ca| c.verify(&ca, now).map(|_| "valid".to_string()));
        if let Some(Err(e)) = &status {
            refused = Some(e.to_string());
        }
        json!({
            "kind": "certificate",
            "name": b.name,
            "addr": b.addr.map(|a: Ipv4Addr| a.to_string()),
            "fingerprint": hex32(&c.fingerprint()),
            "ca": hex32(&b.ca),
            "node_sign_key": hex32(&b.node.sign),
            "node_dh_key": hex32(&b.node.dh),
            "not_before": b.not_before,
            "expires": b.not_after,
            "verified": status.map(|s| s.unwrap_or_else(|e| e.to_string())),
        })
    };
    if *json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            match val {
                serde_json::Value::Null => {}
                serde_json::Value::String(s) => println!("{k:<14} {s}"),
                serde_json::Value::Number(n) if k != "kind" => match n.as_u64() {
                    Some(t) => println!("{k:<14} {t} ({})", utc(t)),
                    None => println!("{k:<14} {n}"),
                },
                other => println!("{k:<14} {other}"),
            }
        }
    }
    // Scripts check with the exit code.
    match refused {
        Some(why) => bail!("{} does not verify under that CA: {why}", file.display()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_files_go_beside_their_keys() {
        assert_eq!(pub_path(Path::new("/x/ca.key")), Path::new("/x/ca.pub"));
        assert_eq!(pub_path(Path::new("node.key")), Path::new("node.pub"));
        assert_eq!(pub_path(Path::new("/x/secret")), Path::new("/x/secret.pub"));
        assert_eq!(pub_path(Path::new("a.b")), Path::new("a.b.pub"));
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_618_552), "2026-12-07 04:42:32 UTC");
        assert_eq!(utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }

    #[test]
    fn fingerprints_are_64_hex_digits() {
        assert!(parse_fingerprint(&"ab".repeat(32)).is_ok());
        assert!(parse_fingerprint(&"ab".repeat(31)).is_err());
        assert!(parse_fingerprint("zz").is_err());
    }
}
