//! Dense linear algebra for the FedSVD server.
//!
//! Job: thin QR and SVD (f32 and f64), the exact SVD of a low-rank product
//! `B·A` given in factored form, the refactorization `B·A = B_new·A_new` with
//! `A_new` having orthonormal rows, and a randomized SVD over linear
//! operators.
//!
//! Boundary: ndarray types in and out, no IO, no other fedsvd crate.
