//! The global adapter state the server owns and broadcasts.

use ndarray::Array2;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One adapted linear layer `W = W0 + Δ + s·B·A`: its LoRA factors and, for
/// the methods that merge updates into the base weights (FLoRA, FedEx-LoRA),
/// the merged delta `Δ` that clients must add to the frozen `W0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleAdapter {
    /// The module's name in the model, e.g. `encoder.layer.0.attention.self.query`.
    pub name: String,
    /// `A`: r × d_in.
    pub a: Array2<f32>,
    /// `B`: d_out × r.
    pub b: Array2<f32>,
    /// Merged base-weight delta, d_out × d_in; `None` while nothing was merged.
    pub base_delta: Option<Array2<f32>>,
}

impl ModuleAdapter {
    /// A fresh adapter as every method starts it: `A` Kaiming-uniform
    /// U(−1/√d_in, +1/√d_in) entry by entry, `B = 0`, nothing merged.
    pub fn initialized<R: Rng + ?Sized>(
        name: impl Into<String>,
        d_out: usize,
        d_in: usize,
        rank: usize,
        rng: &mut R,
    ) -> Self {
        Self {
            name: name.into(),
            a: kaiming_uniform(rank, d_in, rng),
            b: Array2::zeros((d_out, rank)),
            base_delta: None,
        }
    }

    /// LoRA rank r.
    pub fn rank(&self) -> usize {
        self.a.nrows()
    }

    /// Output dimension d_out.
    pub fn d_out(&self) -> usize {
        self.b.nrows()
    }

    /// Input dimension d_in.
    pub fn d_in(&self) -> usize {
        self.a.ncols()
    }

    /// The low-rank product `B·A` (d_out × d_in), unscaled.
    pub fn product(&self) -> Array2<f32> {
        self.b.dot(&self.a)
    }
}

/// Draws an r × d_in matrix U(−1/√d_in, +1/√d_in), the LoRA initialization of
/// `A` (PyTorch's `kaiming_uniform_(a=√5)` on a d_in fan-in).
pub fn kaiming_uniform<R: Rng + ?Sized>(rank: usize, d_in: usize, rng: &mut R) -> Array2<f32> {
    let bound = 1.0 / (d_in.max(1) as f32).sqrt();
    Array2::from_shape_simple_fn((rank, d_in), || rng.random_range(-bound..=bound))
}

/// Everything the server broadcasts: one adapter per adapted module, the
/// LoRA scale and, when trainable, the classifier head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalState {
    /// Adapted modules in the model's fixed order.
    pub modules: Vec<ModuleAdapter>,
    /// LoRA scale `s = lora_alpha / r`.
    pub scale: f32,
    /// Trainable classifier head parameters, flattened, when the head is
    /// trained; `None` when it stays frozen at its initialization.
    pub head: Option<Vec<f32>>,
}

impl GlobalState {
    /// Number of parameters in all `B` factors.
    pub fn b_parameters(&self) -> usize {
        self.modules.iter().map(|m| m.b.len()).sum()
    }

    /// Number of parameters in all `A` factors.
    pub fn a_parameters(&self) -> usize {
        self.modules.iter().map(|m| m.a.len()).sum()
    }

    /// Number of parameters in all merged base-weight deltas.
    pub fn base_delta_parameters(&self) -> usize {
        self.modules
            .iter()
            .filter_map(|m| m.base_delta.as_ref())
            .map(Array2::len)
            .sum()
    }

    /// Number of trainable head parameters (0 when frozen).
    pub fn head_parameters(&self) -> usize {
        self.head.as_ref().map_or(0, Vec::len)
    }
}

/// What one sampled client sends back after its local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    /// The client's number of local training examples n_k (the aggregation
    /// weight is n_k / Σ n_j over the round's clients).
    pub examples: usize,
    /// `B` of every module, in the global state's order.
    pub b: Vec<Array2<f32>>,
    /// `A` of every module, for methods that train it.
    pub a: Option<Vec<Array2<f32>>>,
    /// The head, when it is trainable.
    pub head: Option<Vec<f32>>,
}

/// Checks that a list of matrices matches the global modules' shapes.
pub(crate) fn check_factors(
    state: &GlobalState,
    factors: &[Array2<f32>],
    which: &str,
    client: usize,
    expected: impl Fn(&ModuleAdapter) -> (usize, usize),
) -> Result<()> {
    if factors.len() != state.modules.len() {
        return Err(Error::ShapeMismatch {
            context: format!("client update {client}: number of {which} factors"),
            expected: vec![state.modules.len()],
            actual: vec![factors.len()],
        });
    }
    for (module, factor) in state.modules.iter().zip(factors) {
        let (rows, cols) = expected(module);
        if factor.dim() != (rows, cols) {
            return Err(Error::ShapeMismatch {
                context: format!("client update {client}: {which} of {}", module.name),
                expected: vec![rows, cols],
                actual: vec![factor.nrows(), factor.ncols()],
            });
        }
        if factor.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                context: format!("client update {client}: {which} of {}", module.name),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn initialization_is_kaiming_uniform_and_zero_b() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let m = ModuleAdapter::initialized("q", 12, 100, 4, &mut rng);
        assert_eq!(m.a.dim(), (4, 100));
        assert_eq!(m.b.dim(), (12, 4));
        assert!(m.b.iter().all(|&x| x == 0.0));
        let bound = 0.1;
        assert!(m.a.iter().all(|&x| x.abs() <= bound));
        // A uniform on ±0.1 has variance 0.1²/3; 400 draws pin it to ~±20 %.
        let var = m.a.iter().map(|&x| x * x).sum::<f32>() / m.a.len() as f32;
        assert!(
            (var - 0.01 / 3.0).abs() < 0.2 * 0.01 / 3.0,
            "variance {var}"
        );
    }
}
