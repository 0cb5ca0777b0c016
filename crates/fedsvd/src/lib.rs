//! Differentially private federated fine-tuning of LoRA adapters.
//!
//! Job: the orchestration: clients running DP-SGD, the server sampling,
//! aggregating and applying its strategy (FedSVD, FFA-LoRA, FedAvg-LoRA,
//! FLoRA, FedEx-LoRA), per-client privacy ledgers, evaluation, run folders
//! and checkpoints.
//!
//! Boundary: builds on every other library crate; no CLI concerns.
