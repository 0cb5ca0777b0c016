//! `fedsvd probe --runs DIR,DIR`: the second half of the mechanism
//! measurement. At the last checkpoint of each run, the condition number of
//! every LoRA module's Gauss–Newton matrix of the mean cross-entropy with
//! respect to that module's `B`, over its non-zero spectrum
//! ([`fedsvd::probe::gauss_newton_conditioning`]). Every run is measured on
//! the same seeded sample of training examples, drawn from the pooled
//! clients of the first run, so runs of one seed and data configuration
//! are compared on identical inputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use fedsvd::probe::ModuleConditioning;
use fedsvd::{ClientData, Runner};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::study::{ProbeArgs, detect_machine};

/// Default result file of the Gauss–Newton probe.
pub const DEFAULT_OUT: &str = "studies/results/probe-gauss-newton.json";

/// Examples per forward/backward pass.
const BATCH: usize = 32;

/// `probe-gauss-newton.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GaussNewtonFile {
    /// Training examples the matrices average over.
    pub examples: usize,
    /// The relative eigenvalue cut-off.
    pub cutoff: f64,
    /// One entry per run folder.
    pub runs: Vec<RunConditioning>,
    /// The machine that measured it.
    pub machine: String,
}

/// The modules of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConditioning {
    /// The run folder as given.
    pub dir: String,
    /// Its method's name.
    pub method: String,
    /// Rounds its checkpoint holds.
    pub rounds: usize,
    /// Wall time of this run's measurement.
    pub seconds: f64,
    /// Every adapted module, in layer order.
    pub modules: Vec<ModuleConditioning>,
}

impl RunConditioning {
    /// The median κ over the modules.
    pub fn median_kappa(&self) -> f64 {
        let mut k: Vec<f64> = self.modules.iter().map(|m| m.kappa).collect();
        k.sort_by(f64::total_cmp);
        match k.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => k[n / 2],
            n => (k[n / 2 - 1] + k[n / 2]) / 2.0,
        }
    }
}

/// Runs the Gauss–Newton probe over `args.runs`.
pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    if args.gn_examples == 0 {
        bail!("--gn-examples must be at least 1");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));
    let assets = crate::assets::ensure_default()?;
    let mut sample: Option<Vec<(usize, usize)>> = None;
    let mut runs = Vec::new();
    for dir in &args.runs {
        let started = Instant::now();
        let federation = Runner::load_read_only(dir, &assets)
            .with_context(|| format!("loading the run folder {}", dir.display()))?;
        let clients = federation.client_data();
        let chosen = sample.get_or_insert_with(|| pick(clients, args.gn_examples));
        let batches = batches(clients, chosen)
            .with_context(|| format!("the probe's examples in {}", dir.display()))?;
        let state = federation.global_lora()?;
        eprintln!(
            "{}: Gauss–Newton matrices of {} modules over {} examples",
            dir.display(),
            state.adapters.len(),
            chosen.len()
        );
        let modules = fedsvd::probe::gauss_newton_conditioning(
            federation.model(),
            &state,
            &batches,
            args.cutoff,
        )?;
        runs.push(RunConditioning {
            dir: dir.display().to_string(),
            method: federation.config().method.name().to_string(),
            rounds: federation.next_round(),
            seconds: started.elapsed().as_secs_f64(),
            modules,
        });
    }
    let file = GaussNewtonFile {
        examples: sample.as_ref().map_or(0, Vec::len),
        cutoff: args.cutoff,
        runs,
        machine: args.machine.clone().unwrap_or_else(detect_machine),
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    fedsvd::runner::write_json_atomic(&out, &file)?;
    print!("{}", table(&file));
    println!("written: {}", out.display());
    Ok(())
}

/// A seeded sample of (client, example) pairs over all clients' examples.
fn pick(clients: &[ClientData], examples: usize) -> Vec<(usize, usize)> {
    let mut all: Vec<(usize, usize)> = clients
        .iter()
        .enumerate()
        .flat_map(|(c, d)| (0..d.len()).map(move |i| (c, i)))
        .collect();
    all.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(0));
    all.truncate(examples);
    all
}

fn batches(
    clients: &[ClientData],
    chosen: &[(usize, usize)],
) -> anyhow::Result<Vec<fedsvd_model::Batch>> {
    let mut out = Vec::new();
    for chunk in chosen.chunks(BATCH) {
        let mut ids = Vec::with_capacity(chunk.len());
        let mut types = Vec::with_capacity(chunk.len());
        let mut pad = 0;
        for &(c, i) in chunk {
            let data = clients.get(c).filter(|d| i < d.len()).with_context(|| {
                format!(
                    "example {i} of client {c} does not exist: the runs do not share one data \
                     configuration"
                )
            })?;
            ids.push(data.ids[i].clone());
            types.push(data.type_ids[i].clone());
            pad = data.pad_id;
        }
        out.push(fedsvd_model::Batch::from_sequences(&ids, &types, pad)?);
    }
    Ok(out)
}

/// The per-module comparison as a Markdown table: one κ column per run.
pub fn table(file: &GaussNewtonFile) -> String {
    use std::fmt::Write as _;
    let mut w = String::new();
    let _ = write!(w, "| module |");
    for r in &file.runs {
        let _ = write!(w, " {} κ (kept) |", crate::report::method_label(&r.method));
    }
    let _ = writeln!(w);
    let _ = write!(w, "|---|");
    for _ in &file.runs {
        let _ = write!(w, "---:|");
    }
    let _ = writeln!(w);
    let modules = file.runs.first().map_or(0, |r| r.modules.len());
    for m in 0..modules {
        let _ = write!(w, "| {} |", file.runs[0].modules[m].module);
        for r in &file.runs {
            match r.modules.get(m) {
                Some(x) => {
                    let _ = write!(w, " {:.3e} ({}) |", x.kappa, x.nonzero);
                }
                None => {
                    let _ = write!(w, " – |");
                }
            }
        }
        let _ = writeln!(w);
    }
    let _ = write!(w, "| **median** |");
    for r in &file.runs {
        let _ = write!(w, " **{:.3e}** |", r.median_kappa());
    }
    let _ = writeln!(w);
    w
}

/// Reads a result file written by [`run`].
pub fn read(path: &Path) -> anyhow::Result<GaussNewtonFile> {
    Ok(fedsvd::runner::read_json(path)?)
}
