//! anomalyd: streaming anomaly detection with autoencoders.
//!
//! Records arrive on Kafka topics; each pipeline scores them with one ONNX model (run by tract),
//! judges each score against an adaptive per-entity threshold, and emits alerts, scores and
//! metrics. The same code scores files offline (`anomalyd score`).
//!
//! # Layout
//! Three layers, each depending only on those above it (no import cycles: a module uses only
//! modules of its own layer or of the layers above).
//!
//! **The detection core**: pure types and functions, no tokio tasks, no Kafka. Everything that
//! decides whether a record is anomalous is here, and is tested with statistical and property
//! tests.
//!
//! | module | what |
//! |---|---|
//! | [`model`] | loading ONNX models under the model contract; batched inference |
//! | [`decode`] | JSON / CSV records → typed records, or a dead-letter reason |
//! | [`window`] | per-key ring buffers for sequence models |
//! | [`baseline`] | per-key slow levels that drifting features are measured from (`anomalyd.baseline`) |
//! | [`batch`] | micro-batching by size and age |
//! | [`threshold`] | adaptive per-key thresholds; [`threshold::evt`]: the extreme-value ones, SPOT and DSPOT |
//! | [`alert`] | hysteresis and alert events |
//! | [`detect`] | the per-pipeline state machine: window → score → threshold → alert |
//! | [`shadow`] | a candidate model's verdicts against the serving one's, and the promotion rule |
//! | [`drift`] | has a pipeline's score stream moved since its model started (a CUSUM) |
//! | [`feedback`] | operators' false-alarm marks on episodes, and what they do to a key's threshold |
//! | [`state`] | each key's state as it is kept outside the process |
//! | [`offsets`] | at-least-once offset tracking |
//! | [`time`] | timestamps |
//!
//! **The runtime**: tokio and rdkafka around the core. One pipeline is an ingest thread (the
//! consumer), a detector task that owns the core's state and receives everything that changes
//! it as messages in stream order, and delivery tasks; no state is shared behind a lock.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | the configuration file: loading, environment overrides, unknown keys, validation (each section's type lives with its component) |
//! | [`log`] | the log's format and level |
//! | [`kafka`] | the `[kafka]` section and the client configurations |
//! | [`ingest`] | the consumer's thread: decoding, rebalances forwarded in stream order, commits; the feedback topic's reader |
//! | [`pipeline`] | the detector task: batches, inference, barriers, revocations, reloads |
//! | [`changelog`] | per-key state in a compacted topic, following its partition across replicas |
//! | [`sink`] | output topics, dead letters and stdout |
//! | [`alertmanager`] | pushing episodes to Alertmanager |
//! | [`metrics`] | Prometheus metrics and the HTTP endpoint |
//! | [`daemon`] | all pipelines, metrics and health together: [`daemon::run`] |
//!
//! **The tools**: what the command line offers besides the daemon.
//!
//! | module | what |
//! |---|---|
//! | [`replay`] | `anomalyd score`: files through the same detector |
//! | [`demo`] | `anomalyd demo`: an in-process Kafka, a generated fleet and the shipped model (fault injection into that Kafka only with the `testing` feature, for the tests) |
//! | [`cli`] | the commands |
//!
//! `main` only parses the command line ([`cli`]); everything else is here, so tests drive the
//! same code.

// One exception, src/model.rs's `clear_upper_vector_state` (an x86 intrinsic), allows itself.
#![deny(unsafe_code)]

pub mod alert;
pub mod alertmanager;
pub mod baseline;
pub mod batch;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod demo;
pub mod detect;
pub mod drift;
pub mod feedback;
pub mod ingest;
pub mod kafka;
pub mod log;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod pipeline;
pub mod replay;
pub mod shadow;
pub mod sink;
pub mod state;
pub mod threshold;
pub mod time;
pub mod window;
