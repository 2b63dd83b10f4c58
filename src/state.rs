//! State: what a pipeline knows of each key (its window, threshold and alert state), in the
//! form it is kept outside the process: the records of the state topic ([`crate::changelog`]).
//! The detector takes changes out ([`crate::detect::Detector::take_changes`]) and restores
//! records in ([`crate::detect::Detector::restore`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::alert::AlertState;
use crate::baseline::Level;
use crate::threshold::ThresholdState;
use crate::window::Ring;

/// What the state was learned with: the state of another model is not restored as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub features: Vec<String>,
    pub window: usize,
    /// The features it measured from a per-key level (`anomalyd.baseline`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baseline: Vec<String>,
}

/// One key's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySnapshot {
    pub key: String,
    pub topic: String,
    pub partition: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Ring>,
    /// The key's levels, for a model with a baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ThresholdState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertState>,
}

/// A changelog record's value: a key's state and what it was learned with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    pub model: ModelIdentity,
    /// The threshold method the state belongs to.
    pub method: String,
    #[serde(flatten)]
    pub state: KeySnapshot,
}

/// A change of one key's state since the last barrier: its new state, or `None` once the key
/// was evicted (a tombstone).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub topic: Arc<str>,
    pub partition: i32,
    pub key: String,
    pub state: Option<StateRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_record_round_trips_through_its_json() {
        let mut ring = Ring::new(2, 1);
        ring.push(&[3.0], &mut Vec::new());
        let r = StateRecord {
            model: ModelIdentity {
                name: "m".into(),
                version: "1".into(),
                features: vec!["a".into()],
                window: 2,
                baseline: vec![],
            },
            method: "ewma".into(),
            state: KeySnapshot {
                key: "k".into(),
                topic: "t".into(),
                partition: 3,
                window: Some(ring),
                level: None,
                threshold: Some(ThresholdState::Ewma {
                    mean: 1.0,
                    var: 2.0,
                }),
                alert: Some(AlertState::default()),
            },
        };
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<StateRecord>(&json).unwrap(), r);
        assert!(serde_json::from_slice::<StateRecord>(b"{ torn").is_err());
    }
}
