#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
// Dense linear algebra for the FedSVD server.
//
// Job: thin QR and SVD (f32 and f64), the exact SVD of a low-rank product
// `B·A` given in factored form, the refactorization `B·A = B_new·A_new` with
// `A_new` having orthonormal rows, and a randomized SVD over linear
// operators.
//
// Boundary: ndarray types in and out, no IO, no other fedsvd crate.

mod error;
mod factored;
mod jacobi;
mod kernels;
mod qr;
mod randomized;
mod scalar;
mod svd;

pub use error::{Error, Result};
pub use factored::{
    Method, factored_svd, refactorize, refactorize_in_place, refactorize_many,
    refactorize_many_in_place, refactorize_many_with,
};
pub use qr::thin_qr;
pub use randomized::{
    FactoredSum, LinearOperator, RsvdParams, randomized_svd, refactorize_randomized,
};
pub use scalar::Real;
pub use svd::{ThinSvd, refactorize_dense, singular_values, thin_svd};
