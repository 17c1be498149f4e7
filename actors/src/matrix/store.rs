//! What an account keeps on disk, and how to tell whether it is usable.
//!
//! ```text
//! <state.dir>/matrix/<alias>/
//! ├── session.json   user ID, device ID, access token (mode 0600)
//! └── store/         the SDK's SQLite state and crypto stores (sync token, room state, keys)
//! ```
//!
//! The two belong together: the crypto store holds the device's keys, and `session.json`
//! the token of that same device. A store without `session.json`, an unreadable
//! `session.json`, or one for another user cannot be used; the caller wipes the directory
//! and logs in fresh when it has a password.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The files of one account.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// `<state.dir>/matrix/<alias>`.
    pub dir: PathBuf,
    /// `<dir>/session.json`.
    pub session: PathBuf,
    /// `<dir>/store`.
    pub store: PathBuf,
}

impl Paths {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            session: dir.join("session.json"),
            store: dir.join("store"),
            dir,
        }
    }
}

/// The persisted session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedSession {
    /// The homeserver it was made on.
    pub homeserver: String,
    /// The full user ID.
    pub user_id: String,
    /// The device ID.
    pub device_id: String,
    /// The access token.
    pub access_token: String,
}

/// What is on disk for an account.
#[derive(Debug)]
pub(crate) enum Local {
    /// Nothing: a first start, or after a wipe.
    Fresh,
    /// A session to restore.
    Saved(SavedSession),
    /// Something that cannot be used, and why.
    Unusable(String),
}

/// Looks at the account's directory. `user_id` is the configured user, if any.
pub(crate) fn inspect(paths: &Paths, user_id: Option<&str>) -> Local {
    match fs::read(&paths.session) {
        Ok(bytes) => match serde_json::from_slice::<SavedSession>(&bytes) {
            Ok(saved) => match user_id {
                Some(user) if !saved.user_id.eq_ignore_ascii_case(user) => {
                    Local::Unusable(format!(
                        "{} belongs to {}, not {user}",
                        paths.session.display(),
                        saved.user_id
                    ))
                }
                _ => Local::Saved(saved),
            },
            Err(e) => Local::Unusable(format!("{} is unreadable: {e}", paths.session.display())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir_has_entries(&paths.store) {
                Local::Unusable(format!(
                    "{} exists without {}",
                    paths.store.display(),
                    paths.session.display()
                ))
            } else {
                Local::Fresh
            }
        }
        Err(e) => Local::Unusable(format!("cannot read {}: {e}", paths.session.display())),
    }
}

fn dir_has_entries(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// Writes `session.json` (mode 0600, through a temporary file and a rename, so a crash
/// leaves the old file or the new one, never half of one). Creates the directory (0700).
pub(crate) fn save(paths: &Paths, session: &SavedSession) -> io::Result<()> {
    create_dir(&paths.dir)?;
    let tmp = paths.dir.join("session.json.tmp");
    let text = serde_json::to_vec_pretty(session).map_err(io::Error::other)?;
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, &paths.session)
}

/// Creates `dir` and its parents; the account directory itself is private (0700).
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Removes everything of the account: session and store.
pub(crate) fn wipe(paths: &Paths) -> io::Result<()> {
    match fs::remove_dir_all(&paths.dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "warden-store-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        dir.join("nova")
    }

    fn session(user: &str) -> SavedSession {
        SavedSession {
            homeserver: "http://127.0.0.1:8008".to_string(),
            user_id: user.to_string(),
            device_id: "DEV".to_string(),
            access_token: "tok".to_string(),
        }
    }

    #[test]
    fn fresh_saved_and_unusable_states_are_told_apart() -> io::Result<()> {
        let paths = Paths::new(temp());
        assert!(matches!(inspect(&paths, None), Local::Fresh));

        save(&paths, &session("@nova:localhost"))?;
        match inspect(&paths, Some("@Nova:localhost")) {
            Local::Saved(s) => assert_eq!(s, session("@nova:localhost")),
            other => panic!("expected a saved session, got {other:?}"),
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&paths.session)?.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "session.json must be private");
        }
        match inspect(&paths, Some("@other:localhost")) {
            Local::Unusable(why) => assert!(why.contains("belongs to @nova:localhost"), "{why}"),
            other => panic!("expected unusable, got {other:?}"),
        }

        fs::write(&paths.session, b"{not json")?;
        assert!(
            matches!(inspect(&paths, None), Local::Unusable(why) if why.contains("unreadable"))
        );

        fs::remove_file(&paths.session)?;
        create_dir(&paths.store)?;
        assert!(
            matches!(inspect(&paths, None), Local::Fresh),
            "an empty store is fresh"
        );
        fs::write(paths.store.join("matrix-sdk-state.sqlite3"), b"x")?;
        assert!(
            matches!(inspect(&paths, None), Local::Unusable(why) if why.contains("without")),
            "a store without its session is unusable"
        );

        wipe(&paths)?;
        assert!(matches!(inspect(&paths, None), Local::Fresh));
        wipe(&paths)?; // idempotent
        if let Some(parent) = paths.dir.parent() {
            fs::remove_dir_all(parent)?;
        }
        Ok(())
    }
}
