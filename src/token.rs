//! The generated operator token: when no `gateway.token` and no `gateway.operators` are
//! configured, `warden run` keeps one in `<state.dir>/gateway.token` (mode 0600, made at
//! first start and reused after), and `warden call` reads it from there by default. The
//! token itself is never logged.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use warden_actors::gateway::protocol::auth::Secret;

/// The file name under the state directory.
pub const FILE: &str = "gateway.token";

/// Longest token file read back.
const MAX_LEN: u64 = 4096;

/// The path of the generated token under `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Reads the operator token from `<state_dir>/gateway.token`, making it (0600, in a 0700
/// directory when that is new) if it does not exist. Returns the token, the file's path
/// and whether it was made now.
pub fn operator_token(state_dir: &Path) -> io::Result<(String, PathBuf, bool)> {
    let path = path(state_dir);
    if let Some(token) = read(&path)? {
        return Ok((token, path, false));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)?;
    let token = Secret::generate().expose().to_string();
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            file.write_all(format!("{token}\n").as_bytes())?;
            file.sync_all()?;
            Ok((token, path, true))
        }
        // Another process made it meanwhile: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match read(&path)? {
            Some(token) => Ok((token, path, false)),
            None => Err(io::Error::other(format!("{} is empty", path.display()))),
        },
        Err(e) => Err(e),
    }
}

/// The token stored at `path`, if the file exists. It must be a regular file (not a
/// symbolic link) readable by its owner only; an empty or oversized one is an error.
pub fn read(path: &Path) -> io::Result<Option<String>> {
    let fail = |what: String| io::Error::other(format!("{}: {what}", path.display()));
    let link = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e.to_string())),
    };
    if !link.file_type().is_file() {
        return Err(fail(
            "is not a regular file (a symbolic link?); remove it".into(),
        ));
    }
    let mut file = fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata()?;
    // The file opened is the one checked, not something swapped in meanwhile.
    if (meta.dev(), meta.ino()) != (link.dev(), link.ino()) {
        return Err(fail("changed while it was being opened".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "mode {mode:o} lets others read it; chmod 600 it (or remove it to get a new one)"
        )));
    }
    if meta.len() > MAX_LEN {
        return Err(fail(format!(
            "larger than {MAX_LEN} bytes; it is not a token file"
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let token = text.trim_end_matches(['\n', '\r']).to_string();
    if token.is_empty() {
        return Err(fail("is empty".into()));
    }
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_with_0600_then_reused() {
        let dir = std::env::temp_dir().join(format!("warden-token-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (first, path, made) = operator_token(&dir).expect("made");
        assert!(made);
        assert_eq!(first.len(), 64);
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, _, made) = operator_token(&dir).expect("read");
        assert!(!made);
        assert_eq!(again, first);
        fs::write(&path, "").expect("empty");
        assert!(
            operator_token(&dir).is_err(),
            "an empty token file is an error"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
