//! The conditioning probe of FedSVD's mechanism (the paper's Table 9):
//! logistic regression on frozen features with weight `w = w0 + B·A`, and
//! the condition number of the Hessian of the mean cross-entropy with
//! respect to `B` as training proceeds, with `A` as FFA-LoRA keeps it (its
//! Kaiming-uniform draw) or as FedSVD makes it (refactorized after every
//! step, so its rows are orthonormal).
//!
//! For a binary logistic model with one logit `z_i = (w0 + B·A)·x_i`
//! (`B` is `1 × r`, `A` is `r × d`) the Hessian with respect to `B` is
//!
//! ```text
//! H(B; A) = A · S · Aᵀ,   S = (1/n) Σ_i p_i (1 − p_i) x_i x_iᵀ
//! ```
//!
//! with `p_i = σ(z_i)`. Its condition number carries `κ(A)²`: an `A` with
//! orthonormal rows leaves only the conditioning of `S` on `A`'s row
//! space. FedSVD's refactorization keeps that row space (its new `A` is an
//! orthonormal basis of the old one's rows), so the probe isolates exactly
//! the factor the method removes.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use fedsvd_model::{Batch, LoraState, Model, ParamKind};

use crate::error::{Error, Result};

/// How the probe trains and what it records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// LoRA rank r.
    pub rank: usize,
    /// Gradient-descent steps on B.
    pub iterations: usize,
    /// Step size.
    pub lr: f64,
    /// Iterations (0 = before the first step) at which κ is recorded.
    pub record: Vec<usize>,
    /// Seed of A's Kaiming-uniform draw.
    pub seed: u64,
}

/// One recorded point of a trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbePoint {
    /// Gradient steps taken.
    pub iteration: usize,
    /// κ(H(B; A)) = λ_max / λ_min.
    pub kappa: f64,
    /// κ(A)² (the factor an orthonormal A removes).
    pub kappa_a_squared: f64,
    /// Mean cross-entropy on the probe's examples.
    pub loss: f64,
    /// Training accuracy on the probe's examples.
    pub accuracy: f64,
}

/// Both trajectories of one A draw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// A stays at its draw (FFA-LoRA).
    pub ffa: Vec<ProbePoint>,
    /// A refactorized after every step (FedSVD).
    pub fedsvd: Vec<ProbePoint>,
}

/// `H(B; A) = A·S·Aᵀ` with `S = (1/n) Σ p_i(1 − p_i) x_i x_iᵀ` at the
/// current weight `w = w0 + B·A` (`x`: n × d; `a`: r × d; `w`: d).
pub fn logistic_hessian_b(
    x: ArrayView2<'_, f64>,
    a: ArrayView2<'_, f64>,
    w: ArrayView1<'_, f64>,
) -> Result<Array2<f64>> {
    let (n, d) = x.dim();
    check_shapes(n, d, a, w)?;
    let z = x.dot(&w);
    let xa = x.dot(&a.t()); // n × r
    let mut weighted = xa.clone();
    for (mut row, &zi) in weighted.axis_iter_mut(Axis(0)).zip(z.iter()) {
        let p = sigmoid(zi);
        row *= p * (1.0 - p) / n as f64;
    }
    Ok(xa.t().dot(&weighted))
}

/// The gradient of the mean cross-entropy with respect to `B` (length r),
/// its value and the training accuracy, at `w = w0 + B·A`; labels are 0/1.
pub fn logistic_gradient_b(
    x: ArrayView2<'_, f64>,
    y: &[f64],
    a: ArrayView2<'_, f64>,
    w: ArrayView1<'_, f64>,
) -> Result<(Array1<f64>, f64, f64)> {
    let (n, d) = x.dim();
    check_shapes(n, d, a, w)?;
    if y.len() != n {
        return Err(Error::ShapeMismatch {
            context: "probe labels".into(),
            expected: vec![n],
            actual: vec![y.len()],
        });
    }
    let z = x.dot(&w);
    let mut residual = Array1::zeros(n);
    let mut loss = 0.0;
    let mut correct = 0usize;
    for i in 0..n {
        let p = sigmoid(z[i]);
        residual[i] = (p - y[i]) / n as f64;
        // log(1 + e^{−z}) for y = 1, log(1 + e^{z}) for y = 0, stably.
        let signed = if y[i] > 0.5 { -z[i] } else { z[i] };
        loss += softplus(signed) / n as f64;
        if (z[i] > 0.0) == (y[i] > 0.5) {
            correct += 1;
        }
    }
    let grad = x.dot(&a.t()).t().dot(&residual);
    Ok((grad, loss, correct as f64 / n as f64))
}

/// λ_max / λ_min of a symmetric positive semi-definite matrix (its singular
/// values are its eigenvalues); infinite when λ_min is not positive.
pub fn condition_number(h: ArrayView2<'_, f64>) -> Result<f64> {
    let svd = fedsvd_linalg::thin_svd(h)?;
    let max = svd.s.iter().copied().fold(0.0f64, f64::max);
    let min = svd.s.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(if min > 0.0 { max / min } else { f64::INFINITY })
}

/// κ(A)² = (σ_max / σ_min)² of A's singular values.
fn kappa_squared(a: ArrayView2<'_, f64>) -> Result<f64> {
    let svd = fedsvd_linalg::thin_svd(a)?;
    let max = svd.s.iter().copied().fold(0.0f64, f64::max);
    let min = svd.s.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(if min > 0.0 {
        (max / min).powi(2)
    } else {
        f64::INFINITY
    })
}

/// A's Kaiming-uniform draw as method.md §3 states it: U(−1/√d, 1/√d).
pub fn kaiming_uniform(rank: usize, d: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let bound = 1.0 / (d as f64).sqrt();
    Array2::from_shape_fn((rank, d), |_| rng.random_range(-bound..bound))
}

/// Trains B by gradient descent from B = 0 (w0 = 0) twice, once with A
/// fixed (FFA-LoRA) and once refactorizing (B, A) after every step
/// (FedSVD), recording κ(H(B; A)) at `config.record`. `x` holds one
/// example per row, `y` its 0/1 label.
pub fn hessian_probe(
    x: ArrayView2<'_, f64>,
    y: &[f64],
    config: &ProbeConfig,
) -> Result<ProbeReport> {
    let (n, d) = x.dim();
    if n == 0 || d == 0 || config.rank == 0 || config.rank > d {
        return Err(Error::InvalidConfig {
            key: "probe",
            value: format!("{n} examples of dimension {d}, rank {}", config.rank),
            allowed: "at least one example, and a rank between 1 and the feature dimension",
        });
    }
    if !(config.lr.is_finite() && config.lr > 0.0) {
        return Err(Error::InvalidConfig {
            key: "probe.lr",
            value: config.lr.to_string(),
            allowed: "a positive finite step size",
        });
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            context: "probe features".into(),
        });
    }
    let a0 = kaiming_uniform(config.rank, d, config.seed);
    let trajectory = |refactorize: bool| -> Result<Vec<ProbePoint>> {
        let mut a = a0.clone();
        let mut b = Array2::<f64>::zeros((1, config.rank));
        let mut points = Vec::new();
        for iteration in 0..=config.iterations {
            let w = b.dot(&a).row(0).to_owned();
            let (grad, loss, accuracy) = logistic_gradient_b(x, y, a.view(), w.view())?;
            if config.record.contains(&iteration) {
                let h = logistic_hessian_b(x, a.view(), w.view())?;
                points.push(ProbePoint {
                    iteration,
                    kappa: condition_number(h.view())?,
                    kappa_a_squared: kappa_squared(a.view())?,
                    loss,
                    accuracy,
                });
            }
            if iteration == config.iterations {
                break;
            }
            b.row_mut(0).scaled_add(-config.lr, &grad);
            if refactorize {
                (b, a) = refactorize_one_output(b.view(), a.view())?;
            }
        }
        Ok(points)
    };
    Ok(ProbeReport {
        ffa: trajectory(false)?,
        fedsvd: trajectory(true)?,
    })
}

/// FedSVD's refactorization of a one-output adapter (`B` is `1 × r`, so
/// `B·A` has rank 1 while A keeps r rows), in the factored form the server
/// uses: `Aᵀ = Q·R`, `c = B·Rᵀ`, and `A_new = Vᵀ·Qᵀ` with `V` orthogonal
/// and first column `c / ‖c‖` (a Householder reflection), so `A_new` is an
/// orthonormal basis of A's own row space with the product's direction
/// first and `B_new = (‖c‖, 0, …, 0)`. The completion of the basis is one
/// choice among many; H's spectrum does not depend on it (it is that of
/// `Qᵀ·S·Q`).
///
/// (The server's `fedsvd_linalg::refactorize` needs `r ≤ d_out`; with `B`
/// padded by zero rows to `r × r` its Jacobi SVD stopped without
/// converging on such rank-1 products after a few probe steps.)
pub fn refactorize_one_output(
    b: ArrayView2<'_, f64>,
    a: ArrayView2<'_, f64>,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let r = a.nrows();
    if b.dim() != (1, r) {
        return Err(Error::ShapeMismatch {
            context: "probe: B of a one-output adapter".into(),
            expected: vec![1, r],
            actual: vec![b.nrows(), b.ncols()],
        });
    }
    let (q, r_factor) = fedsvd_linalg::thin_qr(a.t())?; // d × r, r × r
    let c = b.row(0).dot(&r_factor.t()); // B·Rᵀ, length r
    let norm = c.dot(&c).sqrt();
    let mut v = Array2::<f64>::eye(r);
    if norm > 0.0 {
        // Householder reflection I − 2uuᵀ/‖u‖² with u = c/‖c‖ − e1 maps e1
        // to c/‖c‖; it is symmetric, so its first column is c/‖c‖.
        let mut u = &c / norm;
        u[0] -= 1.0;
        let uu = u.dot(&u);
        if uu > 1e-30 {
            for i in 0..r {
                for j in 0..r {
                    v[[i, j]] -= 2.0 * u[i] * u[j] / uu;
                }
            }
        }
    }
    let a_new = v.t().dot(&q.t());
    let mut b_new = Array2::zeros((1, r));
    b_new[[0, 0]] = norm;
    Ok((b_new, a_new))
}

fn check_shapes(n: usize, d: usize, a: ArrayView2<'_, f64>, w: ArrayView1<'_, f64>) -> Result<()> {
    if a.ncols() != d || w.len() != d || n == 0 {
        return Err(Error::ShapeMismatch {
            context: "probe: features (n × d), A (r × d), w (d)".into(),
            expected: vec![n.max(1), d, d],
            actual: vec![n, a.ncols(), w.len()],
        });
    }
    Ok(())
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// log(1 + e^t), without overflow.
fn softplus(t: f64) -> f64 {
    if t > 0.0 {
        t + (-t).exp().ln_1p()
    } else {
        t.exp().ln_1p()
    }
}

/// The conditioning of the Gauss–Newton matrix of the mean cross-entropy
/// with respect to one LoRA module's `B`, over its non-zero spectrum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleConditioning {
    /// The module, e.g. `layer.3.value`.
    pub module: String,
    /// Entries of `B` (`d_out · r`): the matrix is this wide.
    pub parameters: usize,
    /// Examples the matrix averages over.
    pub examples: usize,
    /// Eigenvalues kept: those above `cutoff · λ_max`.
    pub nonzero: usize,
    /// The relative cut-off below which an eigenvalue counts as zero.
    pub cutoff: f64,
    /// The largest eigenvalue.
    pub lambda_max: f64,
    /// The smallest kept eigenvalue.
    pub lambda_min: f64,
    /// `λ_max / λ_min` over the kept eigenvalues.
    pub kappa: f64,
}

/// For every adapted module whose `B` trains, the matrix `M` whose rows are
/// `√(p_ic / n) · ∂ℓ(x_i, c)/∂B`, over examples i and classes c, with
/// `p_i` the model's softmax; then `G = MᵀM` is the Gauss–Newton matrix
/// `(1/n) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i` of the mean cross-entropy
/// with respect to that `B` (`J_i = ∂z_i/∂B`, `z_i` the logits), because
/// `Σ_c p_c (e_c − p)(e_c − p)ᵀ = diag(p) − ppᵀ` and the gradient of the
/// cross-entropy with label c is `J_iᵀ (p_i − e_c)`. Exact for any number
/// of labels, with no dropout. Returns (module name, M) per module.
pub fn gauss_newton_factors(
    model: &Model,
    state: &LoraState,
    batches: &[Batch],
) -> Result<Vec<(String, Array2<f64>)>> {
    let layout = model.layout(state);
    let slots: Vec<_> = layout
        .slots
        .iter()
        .filter(|s| matches!(s.kind, ParamKind::B(_)))
        .collect();
    if slots.is_empty() {
        return Err(Error::InvalidConfig {
            key: "adapters",
            value: "no trainable B".into(),
            allowed: "a model whose LoRA B factors train (every method does)",
        });
    }
    let n: usize = batches.iter().map(|b| b.lengths.len()).sum();
    if n == 0 {
        return Err(Error::InvalidConfig {
            key: "probe examples",
            value: "0".into(),
            allowed: "at least one example",
        });
    }
    let classes = model.head_config().num_labels;
    let mut factors: Vec<Array2<f64>> = slots
        .iter()
        .map(|s| Array2::zeros((n * classes, s.len())))
        .collect();
    let mut first = 0;
    for batch in batches {
        let size = batch.lengths.len();
        let logits = model.logits(state, batch)?;
        let probs = softmax_rows(&logits, classes, "Gauss–Newton probe logits")?;
        for c in 0..classes {
            let labels = vec![c; size];
            let grads = model.per_example_gradients(state, batch, &labels, None)?;
            for i in 0..size {
                let weight = (probs[i * classes + c] / n as f64).sqrt();
                let row = (first + i) * classes + c;
                let g = &grads[i * layout.len..(i + 1) * layout.len];
                for (slot, m) in slots.iter().zip(factors.iter_mut()) {
                    let part = &g[slot.offset..slot.offset + slot.len()];
                    for (dst, &v) in m.row_mut(row).iter_mut().zip(part) {
                        *dst = weight * f64::from(v);
                    }
                }
            }
        }
        first += size;
    }
    Ok(slots
        .iter()
        .zip(factors)
        .map(|(s, m)| {
            let name = s
                .name
                .strip_suffix(".lora_B")
                .unwrap_or(&s.name)
                .to_string();
            (name, m)
        })
        .collect())
}

/// The condition number of every module's Gauss–Newton matrix (see
/// [`gauss_newton_factors`]) over its eigenvalues above
/// `relative_cutoff · λ_max`: the eigenvalues of `MᵀM` are the squared
/// singular values of `M`, so the `P × P` matrix is never formed.
pub fn gauss_newton_conditioning(
    model: &Model,
    state: &LoraState,
    batches: &[Batch],
    relative_cutoff: f64,
) -> Result<Vec<ModuleConditioning>> {
    if !(relative_cutoff.is_finite() && relative_cutoff > 0.0 && relative_cutoff < 1.0) {
        return Err(Error::InvalidConfig {
            key: "cutoff",
            value: relative_cutoff.to_string(),
            allowed: "a relative eigenvalue cut-off in (0, 1)",
        });
    }
    let examples = batches.iter().map(|b| b.lengths.len()).sum();
    gauss_newton_factors(model, state, batches)?
        .into_iter()
        .map(|(module, m)| {
            let parameters = m.ncols();
            let lambdas: Vec<f64> = fedsvd_linalg::singular_values(m.view())?
                .iter()
                .map(|s| s * s)
                .collect();
            let lambda_max = lambdas.iter().copied().fold(0.0f64, f64::max);
            let kept: Vec<f64> = lambdas
                .into_iter()
                .filter(|&l| l > relative_cutoff * lambda_max)
                .collect();
            let lambda_min = kept.iter().copied().fold(f64::INFINITY, f64::min);
            Ok(ModuleConditioning {
                module,
                parameters,
                examples,
                nonzero: kept.len(),
                cutoff: relative_cutoff,
                lambda_max,
                lambda_min,
                kappa: if kept.is_empty() {
                    f64::INFINITY
                } else {
                    lambda_max / lambda_min
                },
            })
        })
        .collect()
}

/// Row-wise softmax of `[n, classes]` logits, in f64.
fn softmax_rows(logits: &[f32], classes: usize, context: &str) -> Result<Vec<f64>> {
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            context: context.into(),
        });
    }
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = row.iter().map(|&z| f64::from(z - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        out.extend(exps.iter().map(|e| e / total));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// n = d examples √d·e_j (labels alternating): (1/n) Σ x xᵀ = I, so at
    /// B = 0 (p = 1/2) H = A·Aᵀ / 4 exactly.
    fn identity_features(d: usize) -> (Array2<f64>, Vec<f64>) {
        let x = Array2::eye(d) * (d as f64).sqrt();
        let y = (0..d).map(|i| (i % 2) as f64).collect();
        (x, y)
    }

    #[test]
    fn kappa_of_a_known_a_is_its_squared_condition_number() {
        let (x, _) = identity_features(4);
        // Rows of norms 1, 2, 3, orthogonal: H = diag(1, 4, 9) / 4, κ = 9.
        let a = array![
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 2.0, 0.0, 0.0],
            [0.0, 0.0, 3.0, 0.0]
        ];
        let h = logistic_hessian_b(x.view(), a.view(), Array1::zeros(4).view()).unwrap();
        let want = Array2::from_diag(&array![0.25, 1.0, 2.25]);
        assert!((&h - &want).iter().all(|v| v.abs() < 1e-12), "{h}");
        assert!((condition_number(h.view()).unwrap() - 9.0).abs() < 1e-9);
        assert!((kappa_squared(a.view()).unwrap() - 9.0).abs() < 1e-9);
    }

    #[test]
    fn hessian_matches_finite_differences_of_the_gradient() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (n, d, r) = (40, 6, 3);
        let x = Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0));
        let y: Vec<f64> = (0..n).map(|_| f64::from(rng.random_bool(0.5))).collect();
        let a = kaiming_uniform(r, d, 1);
        let b = array![[0.3, -0.2, 0.5]];
        let w = b.dot(&a).row(0).to_owned();
        let h = logistic_hessian_b(x.view(), a.view(), w.view()).unwrap();
        let eps = 1e-6;
        for j in 0..r {
            let mut bp = b.clone();
            bp[[0, j]] += eps;
            let mut bm = b.clone();
            bm[[0, j]] -= eps;
            let wp = bp.dot(&a).row(0).to_owned();
            let wm = bm.dot(&a).row(0).to_owned();
            let (gp, _, _) = logistic_gradient_b(x.view(), &y, a.view(), wp.view()).unwrap();
            let (gm, _, _) = logistic_gradient_b(x.view(), &y, a.view(), wm.view()).unwrap();
            for i in 0..r {
                let fd = (gp[i] - gm[i]) / (2.0 * eps);
                assert!(
                    (fd - h[[i, j]]).abs() < 1e-7,
                    "({i},{j}): {fd} vs {}",
                    h[[i, j]]
                );
            }
        }
    }

    #[test]
    fn fedsvd_removes_the_factor_of_a_and_ffa_keeps_it() {
        // With S = I and B = 0 at the start, FFA's κ is κ(A)² (large for a
        // random 6 × 8 draw) while FedSVD's orthonormal A gives H ∝ I,
        // κ = 1, after its first refactorization.
        let (x, y) = identity_features(8);
        let config = ProbeConfig {
            rank: 6,
            iterations: 1,
            lr: 1e-9,
            record: vec![0, 1],
            seed: 3,
        };
        let report = hessian_probe(x.view(), &y, &config).unwrap();
        let ffa0 = &report.ffa[0];
        assert!(ffa0.kappa > 2.0, "{ffa0:?}");
        assert!((ffa0.kappa - ffa0.kappa_a_squared).abs() < 1e-6 * ffa0.kappa);
        // Before any step both share the draw; after one (tiny) step
        // FedSVD's A is orthonormal: κ(A)² = 1 and κ(H) = 1 to rounding.
        assert_eq!(report.fedsvd[0].kappa, ffa0.kappa);
        let f1 = &report.fedsvd[1];
        assert!((f1.kappa_a_squared - 1.0).abs() < 1e-9, "{f1:?}");
        assert!((f1.kappa - 1.0).abs() < 1e-6, "{f1:?}");
        assert!((report.ffa[1].kappa - ffa0.kappa).abs() < 1e-3 * ffa0.kappa);
    }

    #[test]
    fn training_lowers_the_loss_and_both_models_agree() {
        // The refactorization changes the parametrization, not the model:
        // the first step is the same, so the first losses agree.
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let (n, d) = (200, 10);
        let truth: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x = Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0..1.0));
        let y: Vec<f64> = x
            .rows()
            .into_iter()
            .map(|r| f64::from(r.iter().zip(&truth).map(|(a, b)| a * b).sum::<f64>() > 0.0))
            .collect();
        let config = ProbeConfig {
            rank: 4,
            iterations: 50,
            lr: 2.0,
            record: vec![0, 1, 50],
            seed: 2,
        };
        let report = hessian_probe(x.view(), &y, &config).unwrap();
        assert!((report.ffa[1].loss - report.fedsvd[1].loss).abs() < 1e-12);
        for t in [&report.ffa, &report.fedsvd] {
            assert!(t[2].loss < t[0].loss, "{t:?}");
            assert!((t[0].loss - 2f64.ln()).abs() < 1e-12);
        }
    }

    #[test]
    fn the_one_output_refactorization_keeps_the_model_and_the_row_space() {
        let a = kaiming_uniform(4, 7, 11);
        let b = array![[0.5, -1.0, 2.0, 0.25]];
        let (b_new, a_new) = refactorize_one_output(b.view(), a.view()).unwrap();
        assert!(
            (&b_new.dot(&a_new) - &b.dot(&a))
                .iter()
                .all(|v| v.abs() < 1e-12)
        );
        let gram = a_new.dot(&a_new.t());
        assert!(
            (&gram - &Array2::<f64>::eye(4))
                .iter()
                .all(|v| v.abs() < 1e-12)
        );
        // Same row space: projecting A onto A_new's rows loses nothing.
        let projected = a.dot(&a_new.t()).dot(&a_new);
        assert!((&projected - &a).iter().all(|v| v.abs() < 1e-12));
        // The product's direction comes first.
        assert!(b_new.iter().skip(1).all(|v| v.abs() < 1e-12), "{b_new}");
        assert!(refactorize_one_output(b.t(), a.view()).is_err());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let x = Array2::<f64>::zeros((3, 4));
        let y = [0.0, 1.0, 0.0];
        let mut config = ProbeConfig {
            rank: 5,
            iterations: 1,
            lr: 0.1,
            record: vec![0],
            seed: 0,
        };
        assert!(hessian_probe(x.view(), &y, &config).is_err());
        config.rank = 2;
        config.lr = f64::NAN;
        assert!(hessian_probe(x.view(), &y, &config).is_err());
        config.lr = 0.1;
        assert!(hessian_probe(x.view(), &y[..2], &config).is_err());
        let mut bad = x.clone();
        bad[[0, 0]] = f64::INFINITY;
        assert!(hessian_probe(bad.view(), &y, &config).is_err());
        // Zero features: H = 0, κ infinite, not a panic.
        let report = hessian_probe(x.view(), &y, &config).unwrap();
        assert!(report.ffa[0].kappa.is_infinite());
    }

    fn tiny_classifier(classes: usize) -> (Model, LoraState, Vec<Batch>) {
        use fedsvd_model::testing::{random_values, random_weights, tiny_config};
        use fedsvd_model::{HeadConfig, LoraConfig, Pooling, Target};
        let weights = random_weights(&tiny_config()).unwrap();
        let lora = LoraConfig {
            rank: 2,
            alpha: 2.0,
            dropout: 0.0,
            targets: vec![Target::Query, Target::Value],
            train_a: false,
            train_b: true,
            train_head: true,
        };
        let head = HeadConfig {
            num_labels: classes,
            pooling: Pooling::Mean,
        };
        let model = Model::new(weights, lora, head).unwrap();
        let mut state = model.init_state(3).unwrap();
        for (k, ad) in state.adapters.iter_mut().enumerate() {
            ad.b = random_values(ad.b.len(), 10 + k as u64, 0.5);
        }
        state.head_weight = random_values(state.head_weight.len(), 99, 1.0);
        let seqs = |seed: u64| -> Vec<Vec<u32>> {
            (0..3)
                .map(|i| {
                    random_values(4 + i, seed + i as u64, 1.0)
                        .iter()
                        .map(|v| 1 + ((v.abs() * 48.0) as u32).min(48))
                        .collect()
                })
                .collect()
        };
        let batches = [seqs(1), seqs(7)]
            .iter()
            .map(|ids| {
                let types: Vec<Vec<u32>> = ids.iter().map(|s| vec![0; s.len()]).collect();
                Batch::from_sequences(ids, &types, 0).unwrap()
            })
            .collect();
        (model, state, batches)
    }

    /// `MᵀM` against `(1/n) Σ J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i` with `J_i`
    /// from central differences of the logits in every entry of `B`.
    #[test]
    fn gauss_newton_matches_finite_difference_jacobians() {
        for classes in [2, 3] {
            let (model, state, batches) = tiny_classifier(classes);
            let factors = gauss_newton_factors(&model, &state, &batches).unwrap();
            assert_eq!(factors.len(), state.adapters.len());
            let n: usize = batches.iter().map(|b| b.lengths.len()).sum();
            for (idx, (name, m)) in factors.iter().enumerate() {
                let ad = &state.adapters[idx];
                assert_eq!(name, &format!("layer.{}.{}", ad.layer, ad.target.name()));
                let p = ad.b.len();
                let mut want = Array2::<f64>::zeros((p, p));
                for batch in &batches {
                    let size = batch.lengths.len();
                    let logits = model.logits(&state, batch).unwrap();
                    let probs = softmax_rows(&logits, classes, "test").unwrap();
                    // jac[k][i*classes + c] = ∂z_ic / ∂b_k
                    let eps = 1e-2f32;
                    let jac: Vec<Vec<f64>> = (0..p)
                        .map(|k| {
                            let at = |delta: f32| {
                                let mut s = state.clone();
                                s.adapters[idx].b[k] += delta;
                                model.logits(&s, batch).unwrap()
                            };
                            let (up, down) = (at(eps), at(-eps));
                            up.iter()
                                .zip(&down)
                                .map(|(u, d)| f64::from(u - d) / f64::from(2.0 * eps))
                                .collect()
                        })
                        .collect();
                    for i in 0..size {
                        let pi = &probs[i * classes..(i + 1) * classes];
                        for a in 0..p {
                            for b in 0..p {
                                let mut v = 0.0;
                                for c in 0..classes {
                                    for d in 0..classes {
                                        let h = if c == d { pi[c] } else { 0.0 } - pi[c] * pi[d];
                                        v += jac[a][i * classes + c] * h * jac[b][i * classes + d];
                                    }
                                }
                                want[[a, b]] += v / n as f64;
                            }
                        }
                    }
                }
                let got = m.t().dot(m);
                let scale = want.iter().fold(0.0f64, |acc, v| acc.max(v.abs()));
                assert!(scale > 0.0, "{name}: zero Gauss–Newton matrix");
                let err = (&got - &want)
                    .iter()
                    .fold(0.0f64, |acc, v| acc.max(v.abs()));
                assert!(
                    err < 2e-3 * scale,
                    "{name}, {classes} classes: max error {err} against max entry {scale}"
                );
            }
        }
    }

    #[test]
    fn gauss_newton_conditioning_reports_the_nonzero_spectrum() {
        let (model, state, batches) = tiny_classifier(2);
        let report = gauss_newton_conditioning(&model, &state, &batches, 1e-9).unwrap();
        let factors = gauss_newton_factors(&model, &state, &batches).unwrap();
        for (r, (_, m)) in report.iter().zip(&factors) {
            assert_eq!(r.examples, 6);
            assert_eq!(r.parameters, m.ncols());
            // Two labels: each example adds a rank-one term, so at most 6
            // non-zero eigenvalues out of d_out · r = 64.
            assert!((1..=6).contains(&r.nonzero), "{r:?}");
            let gram = m.t().dot(m);
            let trace: f64 = gram.diag().sum();
            assert!(r.lambda_max <= trace * (1.0 + 1e-9) && r.lambda_max >= trace / 6.0);
            assert!(r.kappa >= 1.0 && r.kappa.is_finite());
        }
        assert!(gauss_newton_conditioning(&model, &state, &batches, 0.0).is_err());
        assert!(gauss_newton_conditioning(&model, &state, &[], 1e-6).is_err());
    }
}
