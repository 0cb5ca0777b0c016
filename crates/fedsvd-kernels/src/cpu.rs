//! The CPU reference backend (rayon). Every reduction runs in a fixed order
//! that does not depend on the number of threads, so results are
//! bit-identical on any machine with the same float semantics.

use ndarray::{Array1, Array3, ArrayView3};
use rayon::prelude::*;

use crate::philox::for_each_gaussian;
use crate::types::{check_at_least, check_len, check_matrix};
use crate::{Buffer, Error, GradShape, Kernels, NoiseSpec, OutLayout, Result, clip_factors};

/// Columns per parallel work item of the column-wise sums.
const COL_CHUNK: usize = 4096;

/// Per-example gradients `out_i = G_iᵀ H_i` and their squared Frobenius
/// norms, on host slices. See [`GradShape`] and [`OutLayout`] for the layouts.
/// Elements of `out` outside the blocks are left untouched.
pub fn per_example_grads(
    g: &[f32],
    h: &[f32],
    shape: GradShape,
    layout: OutLayout,
    out: &mut [f32],
    sq_norms: &mut [f32],
) -> Result<()> {
    const OP: &str = "per_example_grads";
    shape.validate(OP)?;
    layout.validate(&shape, OP)?;
    check_len("per_example_grads: g", shape.g_len(), g.len())?;
    check_len("per_example_grads: h", shape.h_len(), h.len())?;
    check_at_least(
        "per_example_grads: out",
        layout.required_len(&shape),
        out.len(),
    )?;
    check_len("per_example_grads: sq_norms", shape.batch, sq_norms.len())?;
    let GradShape {
        tokens,
        d_out,
        rank,
        ..
    } = shape;
    let needed = layout.required_len(&shape);
    out[..needed]
        .par_chunks_mut(layout.row_stride)
        .zip(sq_norms.par_iter_mut())
        .enumerate()
        .for_each(|(i, (row, sq))| {
            let gi = &g[i * tokens * d_out..(i + 1) * tokens * d_out];
            let hi = &h[i * tokens * rank..(i + 1) * tokens * rank];
            let block = &mut row[layout.offset..layout.offset + d_out * rank];
            // SAFETY: the lengths were checked above: gi is tokens x d_out,
            // hi is tokens x rank and block is d_out x rank, all row-major,
            // and the strides below stay inside them. With beta = 0 the
            // block is overwritten without being read. matrixmultiply
            // splits work over output blocks only, so every element is
            // accumulated in the same order on any number of threads.
            unsafe {
                matrixmultiply::sgemm(
                    d_out,
                    tokens,
                    rank,
                    1.0,
                    gi.as_ptr(),
                    1,
                    d_out as isize,
                    hi.as_ptr(),
                    rank as isize,
                    1,
                    0.0,
                    block.as_mut_ptr(),
                    rank as isize,
                    1,
                );
            }
            *sq = sum_squares(block);
        });
    Ok(())
}

/// [`per_example_grads`] on ndarray views (`batch × tokens × d_out` and
/// `batch × tokens × rank`), returning the `batch × d_out × rank` gradients
/// and the squared norms. Views in any memory order are accepted.
pub fn per_example_grads_view(
    g: ArrayView3<'_, f32>,
    h: ArrayView3<'_, f32>,
) -> Result<(Array3<f32>, Array1<f32>)> {
    let (batch, tokens, d_out) = g.dim();
    let (hb, ht, rank) = h.dim();
    if (hb, ht) != (batch, tokens) {
        return Err(Error::Shape {
            what: "per_example_grads_view",
            detail: format!(
                "g is {batch} x {tokens} x {d_out} but h is {hb} x {ht} x {rank}: batch and tokens must agree"
            ),
        });
    }
    let shape = GradShape {
        batch,
        tokens,
        d_out,
        rank,
    };
    shape.validate("per_example_grads_view")?;
    let g = g.as_standard_layout();
    let h = h.as_standard_layout();
    let (g, h) = match (g.as_slice(), h.as_slice()) {
        (Some(g), Some(h)) => (g, h),
        _ => unreachable!("standard layout arrays are contiguous"),
    };
    let mut out = Array3::<f32>::zeros((batch, d_out, rank));
    let mut sq = Array1::<f32>::zeros(batch);
    let (Some(out_s), Some(sq_s)) = (out.as_slice_mut(), sq.as_slice_mut()) else {
        unreachable!("fresh arrays are contiguous")
    };
    per_example_grads(g, h, shape, OutLayout::packed(&shape), out_s, sq_s)?;
    Ok((out, sq))
}

/// Sum of squares accumulated in f64 in index order, rounded once.
fn sum_squares(x: &[f32]) -> f32 {
    // Eight independent f64 lanes let the compiler vectorize while keeping
    // the order fixed.
    let mut acc = [0.0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            let v = f64::from(c[k]);
            acc[k] += v * v;
        }
    }
    let mut total: f64 = acc.iter().sum();
    for &v in chunks.remainder() {
        total += f64::from(v) * f64::from(v);
    }
    total as f32
}

/// Squared L2 norm of each row of the row-major `rows × cols` matrix `x`.
pub fn row_sq_norms(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    let n = check_matrix("row_sq_norms", rows, cols)?;
    check_len("row_sq_norms: x", n, x.len())?;
    check_len("row_sq_norms: out", rows, out.len())?;
    out.par_iter_mut()
        .zip(x.par_chunks(cols))
        .for_each(|(o, row)| *o = sum_squares(row));
    Ok(())
}

/// `out[p] = Σ_i f_i x[i, p]` with `f_i = min(1, clip / ‖x_i‖)` from the
/// squared norms `sq_norms` (which may cover more tensors than `x`).
pub fn clip_scale_sum(
    x: &[f32],
    rows: usize,
    cols: usize,
    sq_norms: &[f32],
    clip: f32,
    out: &mut [f32],
) -> Result<()> {
    let n = check_matrix("clip_scale_sum", rows, cols)?;
    check_len("clip_scale_sum: x", n, x.len())?;
    check_len("clip_scale_sum: sq_norms", rows, sq_norms.len())?;
    check_len("clip_scale_sum: out", cols, out.len())?;
    let factors = clip_factors(sq_norms, clip)?;
    weighted_column_sum(x, cols, &factors, out);
    Ok(())
}

/// Column sums with row weights; each column sums rows in index order.
fn weighted_column_sum(x: &[f32], cols: usize, factors: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(COL_CHUNK)
        .enumerate()
        .for_each(|(chunk, acc)| {
            let c0 = chunk * COL_CHUNK;
            acc.fill(0.0);
            for (i, &f) in factors.iter().enumerate() {
                let xr = &x[i * cols + c0..i * cols + c0 + acc.len()];
                for (a, &v) in acc.iter_mut().zip(xr) {
                    *a += f * v;
                }
            }
        });
}

/// In place: `x[p] = (x[p] + σC · z(seed, offset + p)) · scale`.
pub fn add_noise(x: &mut [f32], noise: &NoiseSpec) -> Result<()> {
    noise.validate()?;
    let std = noise.std();
    let scale = noise.scale;
    for_each_gaussian(noise.seed, noise.offset, x, |v, z| (v + std * z) * scale);
    Ok(())
}

/// The whole private sum: clip each row of `x` to norm `noise.clip` (norms
/// from `sq_norms`), sum the rows, add N(0, σ²C²) and multiply by
/// `noise.scale`.
pub fn clip_and_noise(
    x: &[f32],
    rows: usize,
    cols: usize,
    sq_norms: &[f32],
    noise: &NoiseSpec,
    out: &mut [f32],
) -> Result<()> {
    noise.validate()?;
    clip_scale_sum(x, rows, cols, sq_norms, noise.clip, out)?;
    add_noise(out, noise)
}

/// The CPU backend: host buffers, rayon threads.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

fn host<'a>(b: &'a Buffer, what: &'static str) -> Result<&'a [f32]> {
    b.as_host().ok_or(Error::WrongBackend {
        backend: what,
        buffer: "a CUDA device",
    })
}

fn host_mut<'a>(b: &'a mut Buffer, what: &'static str) -> Result<&'a mut [f32]> {
    b.as_host_mut().ok_or(Error::WrongBackend {
        backend: what,
        buffer: "a CUDA device",
    })
}

impl Kernels for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        Ok(Buffer::from_host(data.to_vec()))
    }

    fn alloc_zeros(&self, len: usize) -> Result<Buffer> {
        Ok(Buffer::from_host(vec![0.0; len]))
    }

    fn download_into(&self, buf: &Buffer, out: &mut [f32]) -> Result<()> {
        let src = host(buf, "cpu")?;
        check_len("download: out", src.len(), out.len())?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn per_example_grads(
        &self,
        g: &Buffer,
        h: &Buffer,
        shape: GradShape,
        layout: OutLayout,
        out: &mut Buffer,
        sq_norms: &mut Buffer,
    ) -> Result<()> {
        per_example_grads(
            host(g, "cpu")?,
            host(h, "cpu")?,
            shape,
            layout,
            host_mut(out, "cpu")?,
            host_mut(sq_norms, "cpu")?,
        )
    }

    fn row_sq_norms(&self, x: &Buffer, rows: usize, cols: usize, out: &mut Buffer) -> Result<()> {
        row_sq_norms(host(x, "cpu")?, rows, cols, host_mut(out, "cpu")?)
    }

    fn clip_scale_sum(
        &self,
        x: &Buffer,
        rows: usize,
        cols: usize,
        sq_norms: &Buffer,
        clip: f32,
        out: &mut Buffer,
    ) -> Result<()> {
        clip_scale_sum(
            host(x, "cpu")?,
            rows,
            cols,
            host(sq_norms, "cpu")?,
            clip,
            host_mut(out, "cpu")?,
        )
    }

    fn add_noise(&self, x: &mut Buffer, noise: &NoiseSpec) -> Result<()> {
        add_noise(host_mut(x, "cpu")?, noise)
    }

    fn clip_and_noise(
        &self,
        x: &Buffer,
        rows: usize,
        cols: usize,
        sq_norms: &Buffer,
        noise: &NoiseSpec,
        out: &mut Buffer,
    ) -> Result<()> {
        clip_and_noise(
            host(x, "cpu")?,
            rows,
            cols,
            host(sq_norms, "cpu")?,
            noise,
            host_mut(out, "cpu")?,
        )
    }
}
