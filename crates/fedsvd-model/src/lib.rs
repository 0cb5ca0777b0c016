//! A BERT-family encoder with LoRA adapters.
//!
//! Job: load HF checkpoints (`config.json` + `model.safetensors`), tokenize,
//! run forward and backward passes, and return per-example gradients of the
//! trainable parameters (LoRA factors and optionally the classifier head)
//! and nothing else.
//!
//! Boundary: model math in f32; no network; knows nothing of federation or
//! privacy accounting.
