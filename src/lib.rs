//! anomalyd: streaming anomaly detection with autoencoders.
//!
//! Records arrive on Kafka topics; each pipeline scores them with one ONNX model (run by tract),
//! judges each score against an adaptive per-entity threshold, and emits alerts, scores and
//! metrics. The same code scores files offline (`anomalyd score`).
//!
//! # Layout
//! One module per pipeline stage, in the order a record meets them:
//!
//! | module | stage |
//! |---|---|
//! | [`config`] | the configuration file: loading, environment overrides, unknown keys, validation (each section's type lives with its component) |
//! | [`log`] | the log's format and level |
//! | [`model`] | loading ONNX models under the model contract; batched inference |
//! | [`decode`] | JSON / CSV records → typed records, or a dead-letter reason |
//! | [`window`] | per-key ring buffers for sequence models |
//! | [`batch`] | micro-batching by size and age |
//! | [`detect`] | the per-pipeline state machine: window → score → threshold → alert |
//! | [`threshold`] | adaptive per-key thresholds; [`threshold::evt`]: the extreme-value ones, SPOT and DSPOT |
//! | [`alert`] | hysteresis and alert events |
//! | [`sink`] | output topics, dead letters and stdout |
//! | [`alertmanager`] | pushing episodes to Alertmanager |
//! | [`offsets`] | at-least-once offset tracking |
//! | [`checkpoint`] | per-key state saved and restored across restarts |
//! | [`kafka`] | client configuration and rebalance handling |
//! | [`pipeline`] | the tasks of one running pipeline |
//! | [`daemon`] | all pipelines, metrics and health together: [`daemon::run`] |
//! | [`replay`] | `anomalyd score`: files through the same detector |
//! | [`metrics`] | Prometheus metrics and the HTTP endpoint |
//! | [`demo`] | `anomalyd demo`: an in-process Kafka, a generated fleet and the shipped model |
//!
//! `main` only parses the command line ([`cli`]); everything else is here, so tests drive the
//! same code.

#![forbid(unsafe_code)]

pub mod alert;
pub mod alertmanager;
pub mod batch;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod demo;
pub mod detect;
pub mod ingest;
pub mod kafka;
pub mod log;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod pipeline;
pub mod replay;
pub mod sink;
pub mod threshold;
pub mod time;
pub mod window;
