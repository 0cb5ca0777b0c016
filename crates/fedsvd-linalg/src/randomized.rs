//! Randomized SVD (Halko, Martinsson, Tropp 2011) over linear operators.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayBase, ArrayView2, CowArray, Data, Ix2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::factored::factored_svd;
use crate::qr::orthonormal_basis;
use crate::scalar::check_finite;
use crate::svd::ThinSvd;
use crate::{Error, Real, Result};

/// A matrix known only through products with it: what the randomized SVD
/// needs, so sums of factored products never have to be formed densely.
pub trait LinearOperator<T: Real> {
    /// Rows `m` of the operator.
    fn nrows(&self) -> usize;
    /// Columns `n` of the operator.
    fn ncols(&self) -> usize;
    /// `Op·x` for `x` of shape `n × k`; the result is `m × k`.
    fn apply(&self, x: ArrayView2<'_, T>) -> Result<Array2<T>>;
    /// `Opᵀ·y` for `y` of shape `m × k`; the result is `n × k`.
    fn apply_transpose(&self, y: ArrayView2<'_, T>) -> Result<Array2<T>>;
}

fn check_rows(context: &str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::ShapeMismatch {
            context: context.to_string(),
            detail: format!("operand has {got} rows, expected {expected}"),
        });
    }
    Ok(())
}

/// A dense matrix is an operator (GEMM through ndarray/matrixmultiply).
impl<T: Real, S: Data<Elem = T>> LinearOperator<T> for ArrayBase<S, Ix2> {
    fn nrows(&self) -> usize {
        self.dim().0
    }
    fn ncols(&self) -> usize {
        self.dim().1
    }
    fn apply(&self, x: ArrayView2<'_, T>) -> Result<Array2<T>> {
        check_rows("dense operator apply", self.ncols(), x.nrows())?;
        Ok(self.dot(&x))
    }
    fn apply_transpose(&self, y: ArrayView2<'_, T>) -> Result<Array2<T>> {
        check_rows("dense operator apply_transpose", self.nrows(), y.nrows())?;
        Ok(self.t().dot(&y))
    }
}

/// One weighted product `w·B·A` of a [`FactoredSum`].
type Term<'a, T> = (T, CowArray<'a, T, Ix2>, CowArray<'a, T, Ix2>);

/// `Σ_k w_k·B_k·A_k`, never formed: products go through the thin factors,
/// O((d_out + d_in)·r_k·cols) per term. Factors may be borrowed or owned.
#[derive(Debug, Clone)]
pub struct FactoredSum<'a, T: Real> {
    d_out: usize,
    d_in: usize,
    terms: Vec<Term<'a, T>>,
}

impl<'a, T: Real> FactoredSum<'a, T> {
    /// An empty (zero) sum of `d_out × d_in` products.
    pub fn new(d_out: usize, d_in: usize) -> Result<Self> {
        if d_out == 0 || d_in == 0 {
            return Err(Error::Empty {
                what: "FactoredSum".to_string(),
                rows: d_out,
                cols: d_in,
            });
        }
        Ok(Self {
            d_out,
            d_in,
            terms: Vec::new(),
        })
    }

    /// Adds `weight·B·A` with `B` of shape `d_out × r` and `A` of shape
    /// `r × d_in` (each term may have its own `r ≥ 1`).
    pub fn push(
        &mut self,
        weight: T,
        b: impl Into<CowArray<'a, T, Ix2>>,
        a: impl Into<CowArray<'a, T, Ix2>>,
    ) -> Result<()> {
        let (b, a) = (b.into(), a.into());
        let index = self.terms.len();
        if !weight.is_finite() {
            return Err(Error::InvalidParameter {
                name: "weight",
                value: weight.to_string(),
                reason: format!("term {index}: must be finite"),
            });
        }
        let ctx = format!("FactoredSum term {index}");
        if b.nrows() != self.d_out || a.ncols() != self.d_in || b.ncols() != a.nrows() {
            return Err(Error::ShapeMismatch {
                context: ctx,
                detail: format!(
                    "B is {} × {} and A is {} × {}; expected {} × r and r × {}",
                    b.nrows(),
                    b.ncols(),
                    a.nrows(),
                    a.ncols(),
                    self.d_out,
                    self.d_in
                ),
            });
        }
        if b.ncols() == 0 {
            return Err(Error::Empty {
                what: format!("{ctx}: B"),
                rows: b.nrows(),
                cols: 0,
            });
        }
        check_finite(&format!("{ctx}: B"), b.view())?;
        check_finite(&format!("{ctx}: A"), a.view())?;
        self.terms.push((weight, b, a));
        Ok(())
    }

    /// Number of terms.
    pub fn len(&self) -> usize {
        self.terms.len()
    }

    /// No terms (the zero operator).
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The sum as a dense matrix (for tests and small problems).
    pub fn to_dense(&self) -> Array2<T> {
        let mut m = Array2::zeros((self.d_out, self.d_in));
        for (w, b, a) in &self.terms {
            general_mat_mul(*w, b, a, T::one(), &mut m);
        }
        m
    }
}

impl<T: Real> LinearOperator<T> for FactoredSum<'_, T> {
    fn nrows(&self) -> usize {
        self.d_out
    }
    fn ncols(&self) -> usize {
        self.d_in
    }
    fn apply(&self, x: ArrayView2<'_, T>) -> Result<Array2<T>> {
        check_rows("FactoredSum apply", self.d_in, x.nrows())?;
        let mut out = Array2::zeros((self.d_out, x.ncols()));
        for (w, b, a) in &self.terms {
            let ax = a.dot(&x);
            general_mat_mul(*w, b, &ax, T::one(), &mut out);
        }
        Ok(out)
    }
    fn apply_transpose(&self, y: ArrayView2<'_, T>) -> Result<Array2<T>> {
        check_rows("FactoredSum apply_transpose", self.d_out, y.nrows())?;
        let mut out = Array2::zeros((self.d_in, y.ncols()));
        for (w, b, a) in &self.terms {
            let by = b.t().dot(&y);
            general_mat_mul(*w, &a.t(), &by, T::one(), &mut out);
        }
        Ok(out)
    }
}

/// Parameters of [`randomized_svd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RsvdParams {
    /// Target rank `k` (number of triplets returned).
    pub rank: usize,
    /// Oversampling `p`: the sketch has `k + p` columns (capped by the
    /// operator's dimensions).
    pub oversampling: usize,
    /// Power iterations `q`, each re-orthonormalized by QR.
    pub power_iterations: usize,
    /// Seed of the ChaCha8 stream that draws the Gaussian test matrix.
    pub seed: u64,
}

impl RsvdParams {
    /// Rank `k` with the common defaults `p = 10`, `q = 2`, seed 0.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            oversampling: 10,
            power_iterations: 2,
            seed: 0,
        }
    }
}

/// Randomized SVD of an operator: a rank-`k` approximation
/// `U·diag(s)·Vᵀ` (HMT 2011, Algorithms 4.4 and 5.1).
///
/// Draws a Gaussian `n × (k+p)` test matrix from the seed, samples the
/// range `Y = Op·Ω`, runs `q` power iterations `Q ← qr(Op·qr(Opᵀ·Q))`, then
/// takes the exact SVD of the factored `Q·(Qᵀ·Op)` and keeps `k` triplets.
/// Deterministic for a given seed; the [`ThinSvd`] sign convention holds.
///
/// ```
/// use fedsvd_linalg::{FactoredSum, RsvdParams, randomized_svd};
/// use ndarray::array;
/// let b = array![[1.0_f64, 0.0], [0.0, 1.0], [1.0, 1.0]];
/// let a = array![[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]];
/// let mut sum = FactoredSum::new(3, 4).unwrap();
/// sum.push(0.5, b.view(), a.view()).unwrap();
/// sum.push(0.5, b.view(), a.view()).unwrap();
/// let svd = randomized_svd(&sum, &RsvdParams::new(2)).unwrap();
/// assert!((&svd.reconstruct() - &b.dot(&a)).iter().all(|x| x.abs() < 1e-12));
/// ```
pub fn randomized_svd<T: Real, Op: LinearOperator<T> + ?Sized>(
    op: &Op,
    params: &RsvdParams,
) -> Result<ThinSvd<T>> {
    let (m, n) = (op.nrows(), op.ncols());
    if m == 0 || n == 0 {
        return Err(Error::Empty {
            what: "randomized_svd operator".to_string(),
            rows: m,
            cols: n,
        });
    }
    let k = params.rank;
    if k == 0 || k > m.min(n) {
        return Err(Error::InvalidParameter {
            name: "rank",
            value: k.to_string(),
            reason: format!("must be in 1..={} for a {m} × {n} operator", m.min(n)),
        });
    }
    let l = (k.saturating_add(params.oversampling)).min(m).min(n);

    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let omega =
        Array2::from_shape_simple_fn((n, l), || T::from_f64(rng.sample::<f64, _>(StandardNormal)));
    let mut q = orth(op.apply(omega.view())?, m, l, "Op·Ω")?;
    for _ in 0..params.power_iterations {
        let z = orth(op.apply_transpose(q.view())?, n, l, "Opᵀ·Q")?;
        q = orth(op.apply(z.view())?, m, l, "Op·Z")?;
    }
    // Op ≈ Q·(Qᵀ·Op) = Q·Btᵀ, an exact factored product of inner rank l.
    let bt = op.apply_transpose(q.view())?;
    expect_shape("Opᵀ·Q", &bt, n, l)?;
    check_finite("Opᵀ·Q", bt.view())?;
    factored_svd(q.view(), bt.t())?.truncate(k)
}

fn expect_shape<T>(what: &str, a: &Array2<T>, rows: usize, cols: usize) -> Result<()> {
    if a.dim() != (rows, cols) {
        return Err(Error::ShapeMismatch {
            context: format!("randomized_svd: {what}"),
            detail: format!(
                "operator returned {} × {}, expected {rows} × {cols}",
                a.nrows(),
                a.ncols()
            ),
        });
    }
    Ok(())
}

fn orth<T: Real>(y: Array2<T>, rows: usize, cols: usize, what: &str) -> Result<Array2<T>> {
    expect_shape(what, &y, rows, cols)?;
    check_finite(what, y.view())?;
    Ok(orthonormal_basis(y.view()))
}

/// Randomized refactorization of a LoRA pair: `(U_k·Σ_k, V_kᵀ)` of
/// `B·A` from [`randomized_svd`] with `k = r`, applied through the factors.
/// Exact (up to rounding) for a rank-`r` product; provided to compare with
/// [`crate::refactorize`], which is cheaper and deterministic without a seed.
pub fn refactorize_randomized<T: Real>(
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    params: &RsvdParams,
) -> Result<(Array2<T>, Array2<T>)> {
    let (d_out, r, d_in) = crate::factored::validate_product(b, a)?;
    let mut op = FactoredSum::new(d_out, d_in)?;
    op.push(T::one(), b, a)?;
    let p = RsvdParams { rank: r, ..*params };
    let svd = randomized_svd(&op, &p)?;
    Ok((svd.u_sigma(), svd.vt))
}
