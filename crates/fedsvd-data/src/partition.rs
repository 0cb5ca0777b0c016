//! Federated partitions of the training split: IID and Dirichlet non-IID by
//! label (`method.md` §7, after Hsu, Qi and Brown 2019).

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::split::{SPLIT_STREAM, apportion_weights};

const IID_STREAM: u64 = SPLIT_STREAM + 1;
const DIRICHLET_STREAM: u64 = SPLIT_STREAM + 2;

/// How many complete redraws [`partition_dirichlet`] makes before it gives
/// up on the minimum per client.
pub const MAX_DIRICHLET_ATTEMPTS: usize = 10_000;

/// The examples of each client (indices into the data set, ascending).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Partition {
    /// `clients[k]` holds client k's example indices.
    pub clients: Vec<Vec<usize>>,
    /// For a Dirichlet partition, the accepted draw: `proportions[c][k]` is
    /// the share p_{c,k} of class `classes[c]` given to client k.
    pub proportions: Option<Vec<Vec<f64>>>,
    /// The labels the rows of `proportions` refer to, ascending.
    pub classes: Vec<usize>,
    /// Draws made until the minimum per client held (1 for IID).
    pub attempts: usize,
}

/// Deals `indices` evenly among `num_clients` after a seeded shuffle:
/// client sizes differ by at most one.
pub fn partition_iid(
    labels: &[usize],
    indices: &[usize],
    num_clients: usize,
    seed: u64,
) -> Result<Partition> {
    check_indices(labels, indices)?;
    if num_clients == 0 || indices.len() < num_clients {
        return Err(Error::invalid(
            "number of clients",
            format!(
                "{num_clients} clients need between 1 and {} (the number of examples)",
                indices.len()
            ),
        ));
    }
    let mut shuffled = indices.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(IID_STREAM);
    shuffled.shuffle(&mut rng);
    let mut clients = vec![Vec::new(); num_clients];
    for (i, idx) in shuffled.into_iter().enumerate() {
        clients[i % num_clients].push(idx);
    }
    for c in &mut clients {
        c.sort_unstable();
    }
    Ok(Partition {
        clients,
        proportions: None,
        classes: classes_of(labels, indices),
        attempts: 1,
    })
}

/// Non-IID partition by label: for every class c draw
/// p_c ~ Dirichlet(α·1_K) and give client k the share p_{c,k} of that
/// class's examples (rounded by largest remainder, so every example goes to
/// exactly one client). Whole draws are repeated until every client has at
/// least `min_per_client` examples (at most [`MAX_DIRICHLET_ATTEMPTS`]
/// times). Smaller α gives more skew. Deterministic for `seed`.
pub fn partition_dirichlet(
    labels: &[usize],
    indices: &[usize],
    num_clients: usize,
    alpha: f64,
    min_per_client: usize,
    seed: u64,
) -> Result<Partition> {
    check_indices(labels, indices)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::invalid(
            "Dirichlet alpha",
            format!("{alpha} is not a finite positive number"),
        ));
    }
    if num_clients == 0 {
        return Err(Error::invalid("number of clients", "must be at least 1"));
    }
    let min = min_per_client.max(1);
    if num_clients.saturating_mul(min) > indices.len() {
        return Err(Error::Infeasible(format!(
            "{num_clients} clients with at least {min} examples each need {} examples, but the split has {}",
            num_clients.saturating_mul(min),
            indices.len()
        )));
    }
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in indices {
        by_class.entry(labels[i]).or_default().push(i);
    }
    let gamma =
        Gamma::new(alpha, 1.0).map_err(|e| Error::invalid("Dirichlet alpha", e.to_string()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(DIRICHLET_STREAM);
    for attempt in 1..=MAX_DIRICHLET_ATTEMPTS {
        let proportions: Vec<Vec<f64>> = by_class
            .values()
            .map(|_| draw_dirichlet(&gamma, num_clients, &mut rng))
            .collect();
        let counts: Vec<Vec<usize>> = by_class
            .values()
            .zip(&proportions)
            .map(|(members, p)| apportion_weights(p, members.len(), None))
            .collect();
        let smallest = (0..num_clients)
            .map(|k| counts.iter().map(|c| c[k]).sum::<usize>())
            .min()
            .unwrap_or(0);
        if smallest < min {
            continue;
        }
        let mut clients = vec![Vec::new(); num_clients];
        for (members, class_counts) in by_class.values().zip(&counts) {
            let mut members = members.clone();
            members.shuffle(&mut rng);
            let mut start = 0;
            for (k, &n) in class_counts.iter().enumerate() {
                clients[k].extend_from_slice(&members[start..start + n]);
                start += n;
            }
        }
        for c in &mut clients {
            c.sort_unstable();
        }
        return Ok(Partition {
            clients,
            proportions: Some(proportions),
            classes: by_class.keys().copied().collect(),
            attempts: attempt,
        });
    }
    Err(Error::Infeasible(format!(
        "no Dirichlet(alpha = {alpha}) draw in {MAX_DIRICHLET_ATTEMPTS} attempts gave all {num_clients} clients at least {min} examples; raise alpha or lower the minimum"
    )))
}

/// One Dirichlet(α·1_K) draw from normalized Gamma(α, 1) draws. For tiny α
/// every Gamma draw can underflow to zero; the limit of the distribution is
/// then a point mass on one client, chosen uniformly.
fn draw_dirichlet(gamma: &Gamma<f64>, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let mut g: Vec<f64> = (0..k).map(|_| gamma.sample(rng)).collect();
    let sum: f64 = g.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        for x in &mut g {
            *x /= sum;
        }
    } else {
        let mut pick: Vec<usize> = (0..k).collect();
        pick.shuffle(rng);
        g = vec![0.0; k];
        g[pick[0]] = 1.0;
    }
    g
}

fn check_indices(labels: &[usize], indices: &[usize]) -> Result<()> {
    if let Some(&bad) = indices.iter().find(|&&i| i >= labels.len()) {
        return Err(Error::invalid(
            "indices",
            format!("index {bad} is out of range for {} labels", labels.len()),
        ));
    }
    let mut seen = vec![false; labels.len()];
    for &i in indices {
        if std::mem::replace(&mut seen[i], true) {
            return Err(Error::invalid(
                "indices",
                format!("index {i} appears twice"),
            ));
        }
    }
    Ok(())
}

fn classes_of(labels: &[usize], indices: &[usize]) -> Vec<usize> {
    let mut c: Vec<usize> = indices.iter().map(|&i| labels[i]).collect();
    c.sort_unstable();
    c.dedup();
    c
}

/// Examples per client per label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionReport {
    /// Label names, indexing the columns.
    pub label_names: Vec<String>,
    /// `counts[k][l]`: examples of label l held by client k.
    pub counts: Vec<Vec<usize>>,
}

impl PartitionReport {
    /// Counts the labels of every client; labels must index `label_names`.
    pub fn new(partition: &Partition, labels: &[usize], label_names: &[String]) -> Result<Self> {
        let mut counts = vec![vec![0; label_names.len()]; partition.clients.len()];
        for (k, client) in partition.clients.iter().enumerate() {
            for &i in client {
                let label = *labels.get(i).ok_or_else(|| {
                    Error::invalid("partition", format!("index {i} is out of range"))
                })?;
                let slot = counts[k].get_mut(label).ok_or_else(|| {
                    Error::invalid("labels", format!("label {label} has no name"))
                })?;
                *slot += 1;
            }
        }
        Ok(PartitionReport {
            label_names: label_names.to_vec(),
            counts,
        })
    }

    /// Examples per client.
    pub fn client_totals(&self) -> Vec<usize> {
        self.counts.iter().map(|c| c.iter().sum()).collect()
    }

    /// `shares[k][l]`: the fraction of label l's examples held by client k
    /// (each column sums to 1; a label with no examples gives zeros).
    pub fn label_shares(&self) -> Vec<Vec<f64>> {
        let totals: Vec<usize> = (0..self.label_names.len())
            .map(|l| self.counts.iter().map(|c| c[l]).sum())
            .collect();
        self.counts
            .iter()
            .map(|c| {
                c.iter()
                    .zip(&totals)
                    .map(|(&n, &t)| if t == 0 { 0.0 } else { n as f64 / t as f64 })
                    .collect()
            })
            .collect()
    }
}

impl std::fmt::Display for PartitionReport {
    /// A table of examples per client per label, with each label's share of
    /// its examples held by the client in parentheses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shares = self.label_shares();
        let width = self
            .label_names
            .iter()
            .map(|n| n.len())
            .max()
            .unwrap_or(0)
            .max(14);
        write!(f, "{:>6} {:>8}", "client", "total")?;
        for name in &self.label_names {
            write!(f, " {name:>width$}")?;
        }
        writeln!(f)?;
        for (k, (row, total)) in self.counts.iter().zip(self.client_totals()).enumerate() {
            write!(f, "{k:>6} {total:>8}")?;
            for (n, share) in row.iter().zip(&shares[k]) {
                let cell = format!("{n} ({:.1}%)", share * 100.0);
                write!(f, " {cell:>width$}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iid_sizes_differ_by_at_most_one() {
        let labels = vec![0; 103];
        let idx: Vec<usize> = (0..103).collect();
        let p = partition_iid(&labels, &idx, 6, 3).unwrap();
        let sizes: Vec<usize> = p.clients.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 103);
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let labels = vec![0, 1, 0, 1];
        let idx = [0, 1, 2, 3];
        assert!(partition_dirichlet(&labels, &idx, 2, 0.0, 1, 1).is_err());
        assert!(partition_dirichlet(&labels, &idx, 2, f64::NAN, 1, 1).is_err());
        assert!(partition_dirichlet(&labels, &idx, 0, 0.5, 1, 1).is_err());
        assert!(matches!(
            partition_dirichlet(&labels, &idx, 3, 0.5, 2, 1),
            Err(Error::Infeasible(_))
        ));
        assert!(partition_dirichlet(&labels, &[0, 9], 1, 0.5, 1, 1).is_err());
        assert!(partition_dirichlet(&labels, &[0, 0], 1, 0.5, 1, 1).is_err());
        assert!(partition_iid(&labels, &idx, 5, 1).is_err());
    }

    #[test]
    fn tiny_alpha_still_assigns_everything() {
        let labels: Vec<usize> = (0..60).map(|i| i % 3).collect();
        let idx: Vec<usize> = (0..60).collect();
        let p = partition_dirichlet(&labels, &idx, 3, 1e-3, 1, 5).unwrap();
        assert_eq!(p.clients.iter().map(Vec::len).sum::<usize>(), 60);
        assert!(p.clients.iter().all(|c| !c.is_empty()));
    }
}
