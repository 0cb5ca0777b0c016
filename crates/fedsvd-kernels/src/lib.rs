//! The DP-specific hot spots of a DP-SGD step.
//!
//! Job: per-example gradients of LoRA factors (a batched matmul), their
//! norms, clip-scale-and-sum and Gaussian noise, on a CPU reference backend
//! and a CUDA backend loaded at run time.
//!
//! Boundary: the only fedsvd crate that names cudarc; its public API takes and
//! returns plain slices, ndarray views and opaque device buffers. No other
//! fedsvd crate.
