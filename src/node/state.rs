//! State a node keeps across restarts: the revocations it holds, in
//! `<state dir>/<iface>.revocations` (one revocation file line each).
//!
//! The file is ela-fast's by name only if ela-fast can read it as its
//! own: anything else at that path (a symlink, a directory, a file that
//! does not parse) stops the start with one line and is never replaced.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ela_control::identity::CaPub;
use ela_control::revocation::Revocations;

/// Reads the state file if there is one. An absent file (or directory)
/// is an empty state.
pub fn load_revocations(path: &Path, ca: CaPub) -> anyhow::Result<Revocations> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Revocations::new(ca)),
        Err(e) => bail!("state file {}: {e}", path.display()),
    };
    if !meta.file_type().is_file() {
        bail!(
            "state file {} is not a regular file (ela-fast leaves it alone): move it away or pass another --state-dir",
            path.display()
        );
    }
    if meta.len() > 16 << 20 {
        bail!(
            "state file {} is larger than any ela-fast writes",
            path.display()
        );
    }
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading state file {}", path.display()))?;
    Revocations::parse_file(ca, &text).map_err(|(line, e)| {
        anyhow::anyhow!(
            "state file {} line {line}: {e} (ela-fast leaves it alone: move it away or pass another --state-dir)",
            path.display()
        )
    })
}

/// Writes the state file whole: a new temporary file beside it (never
/// an existing one), then a rename over the old state.
pub fn save_revocations(path: &Path, held: &Revocations) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
    }
    let tmp = temp_path(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let res = f
        .write_all(held.to_file_string().as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        bail!("writing state file {}: {e}", path.display());
    }
    Ok(())
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ela_control::identity::CaKey;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("ela-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        Dir(d)
    }

    #[test]
    fn revocations_survive_a_restart_and_foreign_files_are_left_alone() {
        let ca = CaKey::generate(&mut StdRng::seed_from_u64(1));
        let d = dir("persist");
        let path = d.0.join("sub").join("ela0.revocations");
        assert!(load_revocations(&path, ca.public()).unwrap().is_empty());
        let mut held = Revocations::new(ca.public());
        held.add(ca.revoke([4; 32], 1)).unwrap();
        save_revocations(&path, &held).unwrap();
        held.add(ca.revoke([5; 32], 1)).unwrap();
        save_revocations(&path, &held).unwrap();
        let back = load_revocations(&path, ca.public()).unwrap();
        assert!(back.contains(&[4; 32]) && back.contains(&[5; 32]));
        // Only the state file is left: no temporary.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        // Someone else's file at the path: an error, and untouched.
        let other = d.0.join("other.revocations");
        fs::write(&other, "my notes\n").unwrap();
        let e = load_revocations(&other, ca.public())
            .unwrap_err()
            .to_string();
        assert!(e.contains("leaves it alone"), "{e}");
        assert_eq!(fs::read_to_string(&other).unwrap(), "my notes\n");
        let link = d.0.join("link.revocations");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        assert!(load_revocations(&link, ca.public()).is_err());
    }
}
