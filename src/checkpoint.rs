//! Checkpoint: each pipeline's per-key state (windows, thresholds, alert states) saved to a local
//! file, so a restarted daemon resumes with what it had learned instead of re-learning every
//! key from the model's calibration (and re-alerting on levels it had already accepted).
//!
//! The file is `<state_dir>/<pipeline>.checkpoint.json`, written every `checkpoint_interval`
//! and at shutdown, atomically (temporary file, fsync, rename). On start it is read, and each
//! key's state is restored when the key's partition is assigned. It is consistent with the
//! committed offsets only approximately: records processed after the last commit are processed
//! again after a crash and are then learned twice, which a statistical threshold absorbs.
//!
//! The file follows the machine, not the partition: with several replicas, a partition that
//! moves to another replica starts there from the calibration.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::alert::AlertState;
use crate::threshold::ThresholdState;
use crate::window::Ring;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not a checkpoint anomalyd can read: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// What the state was learned with: a checkpoint of another model is not restored as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub features: Vec<String>,
    pub window: usize,
}

/// One pipeline's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub pipeline: String,
    pub model: ModelIdentity,
    /// The threshold method the states belong to.
    pub method: String,
    pub written_at: String,
    pub keys: Vec<KeyCheckpoint>,
}

/// One key's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyCheckpoint {
    pub key: String,
    pub topic: String,
    pub partition: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Ring>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ThresholdState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertState>,
}

/// Where a pipeline's checkpoint lives.
pub fn path(state_dir: &Path, pipeline: &str) -> PathBuf {
    state_dir.join(format!("{pipeline}.checkpoint.json"))
}

/// Writes a checkpoint atomically: a reader (or a crash) sees the old file or the new one.
pub fn save(path: &Path, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    serde_json::to_writer(&mut file, checkpoint).map_err(|e| io(e.into()))?;
    let file = file.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Reads a checkpoint; `None` if there is none yet.
pub fn load(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Makes sure a state directory exists and can be written.
pub fn prepare_dir(dir: &Path) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let probe = dir.join(".anomalyd-write-test");
    let mut f = std::fs::File::create(&probe).map_err(io)?;
    f.write_all(b"ok").map_err(io)?;
    drop(f);
    std::fs::remove_file(&probe).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "fleet");
        assert!(load(&p).unwrap().is_none());
        let mut ring = Ring::new(2, 1);
        ring.push(&[3.0], &mut Vec::new());
        let c = Checkpoint {
            pipeline: "fleet".into(),
            model: ModelIdentity {
                name: "m".into(),
                version: "1".into(),
                features: vec!["a".into()],
                window: 2,
            },
            method: "ewma".into(),
            written_at: "now".into(),
            keys: vec![KeyCheckpoint {
                key: "k".into(),
                topic: "t".into(),
                partition: 3,
                window: Some(ring),
                threshold: Some(ThresholdState::Ewma {
                    mean: 1.0,
                    var: 2.0,
                }),
                alert: Some(AlertState::default()),
            }],
        };
        save(&p, &c).unwrap();
        let back = load(&p).unwrap().unwrap();
        assert_eq!(back.keys, c.keys);
        assert_eq!(back.model, c.model);
        std::fs::write(&p, b"{ torn").unwrap();
        assert!(matches!(load(&p), Err(CheckpointError::Format { .. })));
    }
}
