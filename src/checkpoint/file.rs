//! The resume-token file.
//!
//! The file is small versioned JSON, replaced atomically (temp file, `fsync`, rename, `fsync` of
//! the directory) so that a crash at any instant leaves either the old or the new checkpoint,
//! never a torn one. A lock file next to it keeps a second `watch` off the same token.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use mongodb::bson::Timestamp;
use mongodb::change_stream::event::ResumeToken;

use super::{Checkpoint, StoreError};

/// The token file of one watched collection.
#[derive(Debug)]
pub struct CheckpointFile {
    path: PathBuf,
    /// The token last made durable, to skip rewriting an unchanged position.
    last_saved: Option<(ResumeToken, Option<Timestamp>, Option<super::FillProgress>)>,
}

impl CheckpointFile {
    /// A handle on `path`; nothing is read or written yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CheckpointFile { path: path.into(), last_saved: None }
    }

    /// The token file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the checkpoint. `Ok(None)` when there is no file; any other problem is an error and
    /// the file is left as it is.
    pub fn load(&mut self, expected_namespace: &str) -> Result<Option<Checkpoint>, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return Err(StoreError::Corrupt { path: self.path.clone(), reason: "not UTF-8 text".to_owned() })
            }
            Err(source) => return Err(StoreError::Unreadable { path: self.path.clone(), source }),
        };
        let checkpoint =
            Checkpoint::from_json(&text).map_err(|reason| StoreError::Corrupt { path: self.path.clone(), reason })?;
        if checkpoint.namespace != expected_namespace {
            return Err(StoreError::WrongNamespace {
                path: self.path.clone(),
                found: checkpoint.namespace,
                expected: expected_namespace.to_owned(),
            });
        }
        self.last_saved =
            Some((checkpoint.resume_token.clone(), checkpoint.last_event_cluster_time, checkpoint.fill.clone()));
        Ok(Some(checkpoint))
    }

    /// Makes `checkpoint` durable, unless it records the same position as the last one saved.
    /// Returns whether the file was written.
    pub fn save(&mut self, checkpoint: &Checkpoint) -> Result<bool, StoreError> {
        let position = (checkpoint.resume_token.clone(), checkpoint.last_event_cluster_time, checkpoint.fill.clone());
        if self.last_saved.as_ref() == Some(&position) {
            return Ok(false);
        }
        write_atomically(&self.path, checkpoint.to_json().as_bytes())
            .map_err(|source| StoreError::Unwritable { path: self.path.clone(), source })?;
        self.last_saved = Some(position);
        Ok(true)
    }

    /// Removes the token file (for an explicit `--reset-token`). A missing file is not an error.
    pub fn remove(&mut self) -> Result<(), StoreError> {
        self.last_saved = None;
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(StoreError::Unwritable { path: self.path.clone(), source: e })
            }
            _ => Ok(()),
        }
    }
}

/// Replaces `path` with `contents` so that a crash leaves the old or the new file whole.
///
/// The temporary file gets a fresh random name in the same directory (so the rename stays on one
/// file system) and is created exclusively (`O_CREAT | O_EXCL`): a symlink or file planted at a
/// predictable name can neither redirect nor clobber the write, and two writers never share a
/// temporary file. It is removed again if anything fails before the rename.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let file_name =
        path.file_name().ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "the path names no file"))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(file_name);
    prefix.push(".");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Same mode as a file created the ordinary way (0666 less the umask), as before: other
    // users' tools (`archiver health` run by a monitor) may read the token.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(&dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(&dir)
}

/// Makes the rename durable. Directories cannot be opened for syncing on Windows, where the
/// rename is already durable once `MoveFileEx` returns.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    if cfg!(unix) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Removes the temporary files a crash left between writing and renaming (`.<name>.<random>.tmp`
/// beside the token file): only the lock holder writes them, so once it holds the lock none is in
/// use. Each removal is logged; one that fails is only logged (it is harmless where it is).
fn remove_stale_temp_files(token_file: &Path) {
    let (Some(dir), Some(name)) = (token_file.parent(), token_file.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name.starts_with(&prefix) && file_name.ends_with(".tmp") {
            match fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(file = %entry.path().display(),
                    "removed a temporary token file a crash left behind"),
                Err(e) => tracing::warn!(file = %entry.path().display(), error = %e,
                    "cannot remove a temporary token file a crash left behind"),
            }
        }
    }
}

/// Holds the token file's lock for as long as it lives.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Takes the exclusive lock that keeps two `watch` processes off one token file.
pub fn lock_token_file(token_file: &std::path::Path) -> Result<InstanceLock, StoreError> {
    let mut lock_path = token_file.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::Unwritable { path: token_file.to_path_buf(), source })?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| StoreError::Unwritable { path: lock_path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => {
            remove_stale_temp_files(token_file);
            Ok(InstanceLock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(token_file.to_path_buf())),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Unwritable { path: lock_path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;
    use mongodb::bson::{self, Bson};

    fn sample() -> Checkpoint {
        let token: ResumeToken = bson::from_bson(Bson::Document(doc! { "_data": "8267A1B2C3000000012B0429" })).unwrap();
        Checkpoint {
            resume_token: token,
            namespace: "livraison.Commandes".to_owned(),
            last_event_cluster_time: Some(Timestamp { time: 1_763_740_800, increment: 3 }),
            last_event_wall_time: Some("2025-11-21T16:00:00.123Z".parse().unwrap()),
            saved_at: "2025-11-21T16:00:01Z".parse().unwrap(),
            position_time: None,
            fill: None,
        }
    }

    /// The on-disk format is a public contract: this file must keep parsing, and this build must
    /// keep writing exactly it.
    #[test]
    fn golden_file_round_trips() {
        let golden = include_str!("../../tests/golden/resume_token_v2.json");
        let idle = Checkpoint { position_time: Some("2025-11-21T17:00:00Z".parse().unwrap()), ..sample() };
        assert_eq!(Checkpoint::from_json(golden).unwrap(), idle);
        assert_eq!(idle.to_json(), golden);
        // Version 1, written by earlier builds, still reads.
        let v1 = include_str!("../../tests/golden/resume_token_v1.json");
        assert_eq!(Checkpoint::from_json(v1).unwrap(), sample());
        assert_eq!(sample().to_json(), v1.replace("\"version\": 1", "\"version\": 2"));
    }

    #[test]
    fn a_fill_under_way_round_trips_with_the_type_of_its_last_id() {
        let progress = super::super::FillProgress {
            kind: "gap-fill".to_owned(),
            since: Some("2025-11-21T15:00:00Z".parse().unwrap()),
            after: Some(Bson::Int64(7)),
            started_at: "2025-11-21T16:00:02Z".parse().unwrap(),
        };
        let filling = Checkpoint { fill: Some(progress), ..sample() };
        let text = filling.to_json();
        assert!(text.contains("\"$numberLong\": \"7\""), "{text}");
        assert_eq!(Checkpoint::from_json(&text).unwrap(), filling);
    }

    #[test]
    fn rejects_corrupt_and_unknown_files() {
        for (text, why) in [
            ("", "not valid JSON"),
            ("{\"version\": 9}", "version 9"),
            ("{\"namespace\": \"a.b\"}", "no \"version\""),
            ("[1,2]", "no \"version\""),
        ] {
            let err = Checkpoint::from_json(text).unwrap_err();
            assert!(err.contains(why), "{text:?} gave {err:?}");
        }
        let no_token = sample().to_json().replace("\"_data\"", "\"_other\"");
        assert!(Checkpoint::from_json(&no_token).is_ok(), "any token document is kept");
        let empty_token = sample().to_json().replace("\"_data\": \"8267A1B2C3000000012B0429\"", "");
        assert!(Checkpoint::from_json(&empty_token).is_err());
    }

    #[test]
    fn temporary_files_a_crash_left_are_removed_by_the_next_lock_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resume_token.json");
        let stale = dir.path().join(".resume_token.json.aB3dE9.tmp");
        let other = dir.path().join(".other.json.xyz.tmp");
        std::fs::write(&stale, "{").unwrap();
        std::fs::write(&other, "{").unwrap();
        let _lock = lock_token_file(&path).unwrap();
        assert!(!stale.exists(), "the crash's leftover is removed");
        assert!(other.exists(), "another file's temporary file is not ours");
    }

    #[test]
    fn save_is_atomic_skips_unchanged_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/token.json");
        let mut file = CheckpointFile::new(&path);
        assert_eq!(file.load("livraison.Commandes").unwrap(), None);
        assert!(file.save(&sample()).unwrap());
        assert!(!file.save(&sample()).unwrap(), "unchanged position is not rewritten");
        assert!(!path.with_file_name("token.json.tmp").exists());
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["token.json"], "no temporary file is left behind");
        let mut again = CheckpointFile::new(&path);
        assert_eq!(again.load("livraison.Commandes").unwrap(), Some(sample()));
        assert!(matches!(again.load("other.Commandes"), Err(StoreError::WrongNamespace { .. })));
    }

    /// The temporary file used to have a fixed name next to the token: a symlink planted there
    /// redirected the write to its target.
    #[cfg(unix)]
    #[test]
    fn save_never_follows_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        let victim = dir.path().join("victim.txt");
        fs::write(&victim, "precious").unwrap();
        let planted = dir.path().join("token.json.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();

        let mut file = CheckpointFile::new(&path);
        assert!(file.save(&sample()).unwrap());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious", "the symlink's target was written");
        assert!(fs::symlink_metadata(&planted).unwrap().file_type().is_symlink(), "the planted link is left alone");
        assert!(!fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(CheckpointFile::new(&path).load("livraison.Commandes").unwrap(), Some(sample()));
    }

    #[test]
    fn a_failed_save_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the token should be: the rename fails after the temp file was written.
        let path = dir.path().join("token.json");
        fs::create_dir(&path).unwrap();
        let err = CheckpointFile::new(&path).save(&sample()).unwrap_err();
        assert!(matches!(err, StoreError::Unwritable { .. }), "{err}");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["token.json"], "the temporary file is removed on failure");
    }

    #[test]
    fn corrupt_file_is_an_error_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        fs::write(&path, "{ garbage").unwrap();
        let err = CheckpointFile::new(&path).load("livraison.Commandes").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read_to_string(&path).unwrap(), "{ garbage");
    }

    #[test]
    fn second_instance_cannot_lock_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("t.json");
        let first = lock_token_file(&token).unwrap();
        assert!(matches!(lock_token_file(&token), Err(StoreError::Locked(_))));
        drop(first);
        lock_token_file(&token).unwrap();
    }
}
