//! This node's credentials (issue 10): its key, its certificate and the
//! authority that signed it. Read from `--ca --cert --node-key`, or, in
//! group-secret mode, made at start-up from the group secret, so that both
//! modes admit nodes the same way.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{anyhow, bail};
use ela_control::identity::{self, CaKey, CaPub, Cert, IdentityError, NodeKey};
use ela_dataplane::crypto::GroupSecret;
use rand::{CryptoRng, RngCore};

use crate::identity::{load_ca_pub, load_cert, load_node_key, utc, BACKDATE_SECS, DAY_SECS};

/// Group mode: how long the certificate a node signs for itself is valid.
/// Long, because expiry buys nothing there: the node signs a new one at
/// every start, and any holder of the secret can sign certificates
/// anyway (group mode does not protect against members).
const GROUP_CERT_VALID_SECS: u64 = 10 * 365 * DAY_SECS;

/// The name a group-mode node gives itself without `--name`.
const FALLBACK_NAME: &str = "node";

/// What this node proves itself with.
pub struct Credentials {
    pub key: NodeKey,
    pub cert: Cert,
    /// The authority this node's group trusts.
    pub ca: CaPub,
    /// From the certificate.
    pub name: String,
    /// The certificate's fingerprint (what a revocation names).
    pub fingerprint: [u8; 32],
    /// The certificate's last valid second (Unix time).
    pub expires: u64,
    /// The one overlay address the certificate allows, if fixed.
    pub fixed_addr: Option<Ipv4Addr>,
}

/// The identity flags of a run, as given.
pub struct IdentityFlags<'a> {
    pub ca: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub node_key: Option<&'a Path>,
}

impl IdentityFlags<'_> {
    /// The three paths if all are given, `None` if none is, else an error
    /// naming the missing ones.
    pub fn paths(&self) -> anyhow::Result<Option<(&Path, &Path, &Path)>> {
        match (self.ca, self.cert, self.node_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca, cert, key))),
            (None, None, None) => Ok(None),
            _ => {
                let missing: Vec<&str> = [
                    (self.ca.is_none(), "--ca"),
                    (self.cert.is_none(), "--cert"),
                    (self.node_key.is_none(), "--node-key"),
                ]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, f)| *f)
                .collect();
                bail!(
                    "--ca, --cert and --node-key go together: missing {}",
                    missing.join(" and ")
                )
            }
        }
    }
}

impl Credentials {
    fn new(key: NodeKey, cert: Cert, ca: CaPub) -> Credentials {
        let b = cert.body();
        Credentials {
            name: b.name.clone(),
            fingerprint: cert.fingerprint(),
            expires: b.not_after,
            fixed_addr: b.addr,
            key,
            cert,
            ca,
        }
    }

    /// Reads `--ca`, `--cert` and `--node-key` and checks that they belong
    /// together and are valid at `now_s`; or one line naming the file and
    /// what is wrong with it.
    pub fn load(
        ca_path: &Path,
        cert_path: &Path,
        key_path: &Path,
        now_s: u64,
    ) -> anyhow::Result<Credentials> {
        let ca = load_ca_pub(ca_path)?;
        let cert = load_cert(cert_path)?;
        let key = load_node_key(key_path)?;
        cert.verify_for(&ca, &key, now_s)
            .map_err(|e| refusal(e, ca_path, cert_path, key_path, now_s))?;
        Ok(Credentials::new(key, cert, ca))
    }

    /// Group-secret mode: the authority is derived from the secret (every
    /// holder derives the same one), and the node makes a fresh key and
    /// signs its own certificate with it. The secret is then only an
    /// admission credential over the same machinery as files from a real
    /// authority.
    pub fn from_group_secret<R: RngCore + CryptoRng>(
        secret: &GroupSecret,
        name: &str,
        now_s: u64,
        rng: &mut R,
    ) -> anyhow::Result<Credentials> {
        let authority = CaKey::from_seed(secret.admission_seed());
        let key = NodeKey::generate(rng);
        let cert = authority
            .sign(
                &key.public(),
                name,
                None,
                now_s.saturating_sub(BACKDATE_SECS),
                now_s.saturating_add(GROUP_CERT_VALID_SECS),
            )
            .map_err(|e| anyhow!("--name {name:?}: {e}"))?;
        Ok(Credentials::new(key, cert, authority.public()))
    }
}

/// One line for a certificate that does not verify: which file, why, and
/// for times, when (as a date: a Unix time alone says little).
fn refusal(
    e: IdentityError,
    ca_path: &Path,
    cert_path: &Path,
    key_path: &Path,
    now: u64,
) -> anyhow::Error {
    let cert = cert_path.display();
    match e {
        IdentityError::OtherAuthority { theirs, ours, .. } => anyhow!(
            "certificate {cert} was signed by another authority (CA {theirs}…), not by {} (CA {ours}…)",
            ca_path.display()
        ),
        IdentityError::Expired(t) => anyhow!(
            "certificate {cert} expired at {} (it is now {}): ask the authority for a new one",
            utc(t),
            utc(now)
        ),
        IdentityError::NotYetValid(t) => anyhow!(
            "certificate {cert} is not valid before {} (it is now {}): check this node's clock",
            utc(t),
            utc(now)
        ),
        IdentityError::KeyMismatch => anyhow!(
            "node key {} does not match certificate {cert}: the certificate is for another node's key",
            key_path.display()
        ),
        e => anyhow!(
            "certificate {cert} does not verify under {}: {e}",
            ca_path.display()
        ),
    }
}

/// `--name` for group mode: the given one if valid, else this host's name
/// if it is a valid node name, else `node`.
pub fn group_name(given: Option<&str>) -> anyhow::Result<String> {
    if let Some(n) = given {
        if !identity::valid_name(n) {
            bail!("--name {n:?}: {}", IdentityError::BadName);
        }
        return Ok(n.to_string());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    Ok(if identity::valid_name(host) {
        host.to_string()
    } else {
        FALLBACK_NAME.to_string()
    })
}

/// What a run proves itself with, from its flags: the files if the
/// identity flags are given, else credentials made from the group secret.
pub fn from_flags<R: RngCore + CryptoRng>(
    flags: &IdentityFlags<'_>,
    name: Option<&str>,
    secret: Option<&GroupSecret>,
    now_s: u64,
    rng: &mut R,
) -> anyhow::Result<Credentials> {
    match (flags.paths()?, secret) {
        (Some((ca, cert, key)), _) => {
            if name.is_some() {
                bail!("--name is for group-secret mode only: with --cert, the certificate names this node");
            }
            Credentials::load(ca, cert, key, now_s)
        }
        (None, Some(secret)) => {
            Credentials::from_group_secret(secret, &group_name(name)?, now_s, rng)
        }
        (None, None) => bail!(
            "no credentials: give --ca ca.pub --cert node.cert --node-key node.key (make them with `ela-fast ca init`, `ela-fast node-key` and `ela-fast ca sign`), or a group secret with --key-file PATH (from `ela-fast keygen --out PATH`)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    use std::path::PathBuf;

    const NOW: u64 = 1_800_000_000;

    fn rng() -> rand::rngs::OsRng {
        rand::rngs::OsRng
    }

    /// A directory of our own (created new), removed at the end.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let base = std::env::temp_dir();
            for n in 0..100 {
                let d = base.join(format!("ela-cred-{}-{tag}-{n}", std::process::id()));
                if fs::DirBuilder::new().mode(0o700).create(&d).is_ok() {
                    return Dir(d);
                }
            }
            panic!("no private directory under {}", base.display());
        }

        /// Writes a new file `name` (0600) in the directory.
        fn put(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            // Only this test's own directory, which it created.
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn one_group_secret_one_authority() {
        let s = |b| GroupSecret::from_bytes([b; 32]);
        let a = Credentials::from_group_secret(&s(1), "a", NOW, &mut rng()).unwrap();
        let b = Credentials::from_group_secret(&s(1), "b", NOW, &mut rng()).unwrap();
        let c = Credentials::from_group_secret(&s(2), "c", NOW, &mut rng()).unwrap();
        assert_eq!(a.ca, b.ca, "two nodes of one group trust the same CA");
        assert_ne!(a.ca, c.ca, "another secret, another authority");
        // Each node has a key of its own, certified under the group's CA.
        assert_ne!(a.key.public(), b.key.public());
        a.cert.verify_for(&b.ca, &a.key, NOW).unwrap();
        b.cert.verify_for(&a.ca, &b.key, NOW).unwrap();
        assert!(a.cert.verify(&c.ca, NOW).is_err());
        assert_eq!(a.name, "a");
        assert_eq!(a.fixed_addr, None);
        assert_eq!(a.expires, NOW + GROUP_CERT_VALID_SECS);
        assert_eq!(a.fingerprint, a.cert.fingerprint());
        assert!(Credentials::from_group_secret(&s(1), "a b", NOW, &mut rng()).is_err());
    }

    #[test]
    fn group_names() {
        assert_eq!(group_name(Some("cn-1.lab")).unwrap(), "cn-1.lab");
        let e = group_name(Some("bad name")).unwrap_err().to_string();
        assert!(e.contains("--name") && e.contains("name must be"), "{e}");
        assert!(identity::valid_name(&group_name(None).unwrap()));
    }

    #[test]
    fn flags_go_together() {
        let p = Path::new("x");
        let f = |ca, cert, node_key| IdentityFlags { ca, cert, node_key };
        assert!(f(None, None, None).paths().unwrap().is_none());
        assert!(f(Some(p), Some(p), Some(p)).paths().unwrap().is_some());
        let e = f(Some(p), None, None).paths().unwrap_err().to_string();
        assert!(e.ends_with("missing --cert and --node-key"), "{e}");
        let e = f(Some(p), Some(p), None).paths().unwrap_err().to_string();
        assert!(e.ends_with("missing --node-key"), "{e}");
        let e = from_flags(&f(None, None, None), None, None, NOW, &mut rng())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("ela-fast ca init") && e.contains("ela-fast keygen"),
            "{e}"
        );
        let s = GroupSecret::from_bytes([3; 32]);
        let c = from_flags(&f(None, None, None), Some("n1"), Some(&s), NOW, &mut rng()).unwrap();
        assert_eq!(c.name, "n1");
    }

    /// The error line of `Credentials::load` as `main` prints it.
    fn load_err(ca: &Path, cert: &Path, key: &Path, now: u64) -> String {
        let e = Credentials::load(ca, cert, key, now)
            .err()
            .expect("refused");
        e.chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": ")
    }

    #[test]
    fn loading_says_which_file_and_why() {
        let d = Dir::new("load");
        let ca = CaKey::generate(&mut rng());
        let other = CaKey::generate(&mut rng());
        let node = NodeKey::generate(&mut rng());
        let stranger = NodeKey::generate(&mut rng());
        let sign = |ca: &CaKey, from: u64, to: u64| {
            ca.sign(
                &node.public(),
                "cn1",
                Some(Ipv4Addr::new(10, 0, 0, 7)),
                from,
                to,
            )
            .unwrap()
            .to_file_string()
        };
        let ca_pub = d.put("ca.pub", &ca.public().to_file_string());
        let key = d.put("node.key", &node.to_file_string());
        let cert = d.put("node.cert", &sign(&ca, NOW - 10, NOW + 10));

        let c = Credentials::load(&ca_pub, &cert, &key, NOW).unwrap();
        assert_eq!(c.name, "cn1");
        assert_eq!(c.fixed_addr, Some(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(c.expires, NOW + 10);
        assert_eq!(c.ca, ca.public());

        let foreign = d.put("foreign.cert", &sign(&other, NOW - 10, NOW + 10));
        let wrong_key = d.put("stranger.key", &stranger.to_file_string());
        let garbage = d.put("garbage.cert", "ela-fast-cert-v1 00ff\n");
        let missing = d.0.join("missing.pub");
        let cases: Vec<(String, &[&str])> = vec![
            (
                load_err(&missing, &cert, &key, NOW),
                &["missing.pub", "No such file"],
            ),
            (
                load_err(&cert, &cert, &key, NOW),
                &["node.cert", "not an ela-fast-ca-pub-v1 file"],
            ),
            (
                load_err(&ca_pub, &key, &key, NOW),
                &["node.key", "not an ela-fast-cert-v1 file"],
            ),
            (
                load_err(&ca_pub, &garbage, &key, NOW),
                &["garbage.cert", "bytes"],
            ),
            (
                load_err(&ca_pub, &foreign, &key, NOW),
                &["foreign.cert", "another authority", "ca.pub"],
            ),
            (
                load_err(&ca_pub, &cert, &key, NOW + 11),
                &["node.cert", "expired at 2027-01-15 08:00:10 UTC"],
            ),
            (
                load_err(&ca_pub, &cert, &key, NOW - 11),
                &["node.cert", "not valid before 2027-01-15 07:59:50 UTC"],
            ),
            (
                load_err(&ca_pub, &cert, &wrong_key, NOW),
                &["stranger.key", "does not match", "node.cert"],
            ),
        ];
        for (err, wants) in cases {
            assert!(!err.contains('\n'), "{err}");
            for w in wants {
                assert!(err.contains(w), "wanted {w:?} in {err:?}");
            }
        }
    }
}
