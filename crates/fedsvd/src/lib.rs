//! Differentially private federated fine-tuning of LoRA adapters.
//!
//! Job: the orchestration: clients running DP-SGD, the server sampling,
//! aggregating and applying its strategy (FedSVD, FFA-LoRA, FedAvg-LoRA,
//! FLoRA, FedEx-LoRA), per-client privacy ledgers, evaluation, run folders
//! and checkpoints.
//!
//! Boundary: builds on every other library crate; no CLI concerns.
#![warn(missing_docs)]

pub mod adapters;
pub mod audit;
pub mod bench;
pub mod client;
pub mod device;
pub mod error;
pub mod federation;
pub mod probe;
pub mod run;
pub mod runner;
pub mod sampling;
pub mod server;
pub mod strategy;
pub mod study;

pub use adapters::{ClientUpdate, GlobalState, ModuleAdapter};
pub use audit::{AuditConfig, AuditReport, CanaryMode, audit_client, audit_run};
#[cfg(feature = "fault-injection")]
pub use client::Fault;
pub use client::{
    ClientData, ClientStreams, GradientCanaries, Instrumentation, LocalReport, LocalTraining,
    Privatization, private_direction, train_locally, train_locally_instrumented, train_locally_on,
};
pub use device::{DeviceChoice, PrecisionChoice, ResolvedDevice};
pub use error::{Error, Result};
pub use federation::{
    BudgetRule, ClientPrivacy, Federation, FederationCheckpoint, FederationConfig, PrivacyConfig,
    RoundMetrics, TrainingConfig, weights_with_deltas,
};
pub use run::{
    AdapterConfig, DataConfig, FileSource, ModelConfig, PartitionConfig, PoolingConfig,
    PreparedData, RunConfig, load_node_data, load_weights, prepare_data,
};
pub use runner::{RunSummary, Runner};
pub use sampling::sample_clients;
pub use strategy::{Method, ServerStep, Strategy, SvdSolver};
pub use study::{ENDPOINT_WINDOW, Endpoint};
