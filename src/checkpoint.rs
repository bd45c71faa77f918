//! The resume-token file: where `watch` records how far the archive is known to be complete.
//!
//! The file is small versioned JSON, replaced atomically (temp file, `fsync`, rename, `fsync` of
//! the directory) so that a crash at any instant leaves either the old or the new checkpoint,
//! never a torn one. It is written only after the archive acknowledged the batch it covers.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Bson, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use serde::{Deserialize, Serialize};

/// The format version this build writes, and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Why the checkpoint could not be read or written. All of these are fatal: a checkpoint is never
/// silently reset, because that would skip or replay an unknown amount of work.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file exists but cannot be read.
    #[error("cannot read the resume token file {path}: {source}")]
    Unreadable {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but does not hold a checkpoint this build understands.
    #[error(
        "the resume token file {path} is corrupt ({reason}); it was left untouched: \
         fix or move it, or restart with --reset-token to start from now"
    )]
    Corrupt {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint belongs to another collection.
    #[error(
        "the resume token file {path} was written for {found}, not {expected}; \
         use another RESUME_TOKEN_FILE for this collection"
    )]
    WrongNamespace {
        /// The token file.
        path: PathBuf,
        /// The namespace recorded in the file.
        found: String,
        /// The namespace being watched.
        expected: String,
    },
    /// The new checkpoint could not be made durable.
    #[error("cannot write the resume token file {path}: {source}")]
    Unwritable {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One saved position of the change stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The token to resume after.
    pub resume_token: ResumeToken,
    /// `database.collection` of the watched orders.
    pub namespace: String,
    /// Cluster time of the last archived event, if any event was archived since the token
    /// started: what a gap-fill after lost history starts from.
    pub last_event_cluster_time: Option<Timestamp>,
    /// Wall-clock time of the last archived event, for humans and for the gap-fill date bound.
    pub last_event_wall_time: Option<DateTime<Utc>>,
    /// When this checkpoint was written.
    pub saved_at: DateTime<Utc>,
}

/// On-disk layout of version 1. Field order is the order in the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV1 {
    version: u32,
    namespace: String,
    /// The token as relaxed extended JSON, e.g. `{"_data": "8263…"}`.
    resume_token: serde_json::Value,
    last_event_cluster_time: Option<ClusterTimeV1>,
    last_event_wall_time: Option<DateTime<Utc>>,
    saved_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterTimeV1 {
    t: u32,
    i: u32,
}

impl Checkpoint {
    /// A checkpoint saved now, for the position `resume_token`.
    pub fn now(
        resume_token: ResumeToken,
        namespace: &str,
        last_event_cluster_time: Option<Timestamp>,
        last_event_wall_time: Option<DateTime<Utc>>,
    ) -> Self {
        Checkpoint {
            resume_token,
            namespace: namespace.to_owned(),
            last_event_cluster_time,
            last_event_wall_time,
            saved_at: Utc::now(),
        }
    }

    /// Serializes to the file format (pretty JSON with a trailing newline).
    pub fn to_json(&self) -> String {
        let token =
            bson::to_bson(&self.resume_token).map(Bson::into_relaxed_extjson).unwrap_or(serde_json::Value::Null);
        let file = FileV1 {
            version: FORMAT_VERSION,
            namespace: self.namespace.clone(),
            resume_token: token,
            last_event_cluster_time: self
                .last_event_cluster_time
                .map(|ts| ClusterTimeV1 { t: ts.time, i: ts.increment }),
            last_event_wall_time: self.last_event_wall_time,
            saved_at: self.saved_at,
        };
        let mut text = serde_json::to_string_pretty(&file).expect("a checkpoint always serializes");
        text.push('\n');
        text
    }

    /// Parses the file format; the error is a human-readable reason.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "format version {v} is not supported by this build (it reads version {FORMAT_VERSION})"
                ))
            }
            None => return Err("no \"version\" field".to_owned()),
        }
        let file: FileV1 = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let token_bson =
            Bson::try_from(file.resume_token).map_err(|e| format!("resume_token is not extended JSON: {e}"))?;
        if !matches!(&token_bson, Bson::Document(d) if !d.is_empty()) {
            return Err("resume_token is not a non-empty document".to_owned());
        }
        let resume_token: ResumeToken = bson::from_bson(token_bson).map_err(|e| format!("resume_token: {e}"))?;
        Ok(Checkpoint {
            resume_token,
            namespace: file.namespace,
            last_event_cluster_time: file.last_event_cluster_time.map(|ct| Timestamp { time: ct.t, increment: ct.i }),
            last_event_wall_time: file.last_event_wall_time,
            saved_at: file.saved_at,
        })
    }
}

/// The token file of one watched collection.
#[derive(Debug)]
pub struct CheckpointFile {
    path: PathBuf,
    /// The token last made durable, to skip rewriting an unchanged position.
    last_saved: Option<(ResumeToken, Option<Timestamp>)>,
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
    pub fn load(&mut self, expected_namespace: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return Err(CheckpointError::Corrupt { path: self.path.clone(), reason: "not UTF-8 text".to_owned() })
            }
            Err(source) => return Err(CheckpointError::Unreadable { path: self.path.clone(), source }),
        };
        let checkpoint = Checkpoint::from_json(&text)
            .map_err(|reason| CheckpointError::Corrupt { path: self.path.clone(), reason })?;
        if checkpoint.namespace != expected_namespace {
            return Err(CheckpointError::WrongNamespace {
                path: self.path.clone(),
                found: checkpoint.namespace,
                expected: expected_namespace.to_owned(),
            });
        }
        self.last_saved = Some((checkpoint.resume_token.clone(), checkpoint.last_event_cluster_time));
        Ok(Some(checkpoint))
    }

    /// Makes `checkpoint` durable, unless it records the same position as the last one saved.
    /// Returns whether the file was written.
    pub fn save(&mut self, checkpoint: &Checkpoint) -> Result<bool, CheckpointError> {
        let position = (checkpoint.resume_token.clone(), checkpoint.last_event_cluster_time);
        if self.last_saved.as_ref() == Some(&position) {
            return Ok(false);
        }
        write_atomically(&self.path, checkpoint.to_json().as_bytes())
            .map_err(|source| CheckpointError::Unwritable { path: self.path.clone(), source })?;
        self.last_saved = Some(position);
        Ok(true)
    }

    /// Removes the token file (for an explicit `--reset-token`). A missing file is not an error.
    pub fn remove(&mut self) -> Result<(), CheckpointError> {
        self.last_saved = None;
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(CheckpointError::Unwritable { path: self.path.clone(), source: e })
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

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn sample() -> Checkpoint {
        let token: ResumeToken = bson::from_bson(Bson::Document(doc! { "_data": "8267A1B2C3000000012B0429" })).unwrap();
        Checkpoint {
            resume_token: token,
            namespace: "livraison.Commandes".to_owned(),
            last_event_cluster_time: Some(Timestamp { time: 1_763_740_800, increment: 3 }),
            last_event_wall_time: Some("2025-11-21T16:00:00.123Z".parse().unwrap()),
            saved_at: "2025-11-21T16:00:01Z".parse().unwrap(),
        }
    }

    /// The on-disk format is a public contract: this file must keep parsing, and this build must
    /// keep writing exactly it.
    #[test]
    fn golden_file_round_trips() {
        let golden = include_str!("../tests/golden/resume_token_v1.json");
        assert_eq!(Checkpoint::from_json(golden).unwrap(), sample());
        assert_eq!(sample().to_json(), golden);
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
        assert!(matches!(again.load("other.Commandes"), Err(CheckpointError::WrongNamespace { .. })));
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
        assert!(matches!(err, CheckpointError::Unwritable { .. }), "{err}");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["token.json"], "the temporary file is removed on failure");
    }

    #[test]
    fn corrupt_file_is_an_error_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        fs::write(&path, "{ garbage").unwrap();
        let err = CheckpointFile::new(&path).load("livraison.Commandes").unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read_to_string(&path).unwrap(), "{ garbage");
    }
}
