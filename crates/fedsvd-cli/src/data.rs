//! `fedsvd data …`: inspect data sets and federated partitions.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use fedsvd_data::{
    Dataset, DatasetName, DatasetStats, OnMalformed, PartitionReport, TableSpec, TokenStats,
    assets, partition_dirichlet, partition_iid, train_test_split,
};
use serde::Serialize;

/// Data subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Size, label counts and length percentiles of a data set.
    Stats(StatsArgs),
    /// Split a data set, partition the training split among clients and
    /// print examples per client per label.
    Partition(PartitionArgs),
}

/// Which data set to load.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// rt, bbc-topic, bbc-pairs, spam, or csv / jsonl with --file.
    name: String,
    /// Assets folder [default: $FEDSVD_ASSETS, else the workspace root's
    /// `assets/`, else ./assets].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seed of the constructed bbc-pairs task.
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    /// The user's CSV (with a header row) or JSON Lines file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Column (CSV header or JSON key) holding the text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Column holding the second text of a pair task.
    #[arg(long)]
    pair_column: Option<String>,
    /// Column holding the label.
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Skip malformed rows (listed in the output) instead of failing.
    #[arg(long)]
    skip_malformed: bool,
}

/// Options of `fedsvd data stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Skip the token-length percentiles (they need the fetched MiniLM
    /// tokenizer).
    #[arg(long)]
    no_tokens: bool,
    /// Truncation length for the token counts (the model's maximum is 512).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
}

/// Options of `fedsvd data partition`.
#[derive(Debug, Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Number of clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Dirichlet concentration (smaller = more skew).
    #[arg(long, default_value_t = 0.5, conflicts_with = "iid")]
    alpha: f64,
    /// Deal the examples evenly instead (IID).
    #[arg(long)]
    iid: bool,
    /// Fewest examples a client may get.
    #[arg(long, default_value_t = 1)]
    min_per_client: usize,
    /// Fraction held out for evaluation (never given to a client).
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// Seed of the split and the partition.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs a data subcommand.
pub fn run(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Stats(args) => stats(&args),
        DataCommand::Partition(args) => partition(&args),
    }
}

/// Loads the data set the arguments name.
fn load(args: &SourceArgs) -> anyhow::Result<Dataset> {
    let table = |loader: fn(&TableSpec) -> fedsvd_data::Result<Dataset>| {
        let Some(path) = args.file.clone() else {
            bail!("`{}` needs --file PATH", args.name);
        };
        let spec = TableSpec {
            path,
            text_column: args.text_column.clone(),
            pair_column: args.pair_column.clone(),
            label_column: args.label_column.clone(),
            on_malformed: if args.skip_malformed {
                OnMalformed::Skip
            } else {
                OnMalformed::Error
            },
        };
        Ok(loader(&spec)?)
    };
    match args.name.as_str() {
        "csv" => table(fedsvd_data::load_csv),
        "jsonl" => table(fedsvd_data::load_jsonl),
        other => {
            let name: DatasetName = other.parse()?;
            let dir = args.dir.clone().unwrap_or_else(assets::default_dir);
            fedsvd_data::load(name, &dir, args.data_seed)
                .with_context(|| format!("loading {name} from {}", dir.display()))
        }
    }
}

fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    let data = load(&args.source)?;
    let tokens = if args.no_tokens {
        None
    } else {
        token_stats(&data, &args.source, args.max_len)?
    };
    let stats = DatasetStats::of(&data).with_tokens(tokens);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    print!("{stats}");
    if stats.tokens.is_none() && !args.no_tokens {
        println!(
            "tokens: skipped (the MiniLM tokenizer is not installed; run `fedsvd assets fetch`)"
        );
    }
    const SHOWN: usize = 5;
    for s in data.report.skipped.iter().take(SHOWN) {
        let line = s.line.map(|l| format!(":{l}")).unwrap_or_default();
        println!("  skipped {}{line}: {}", s.path.display(), s.reason);
    }
    if data.report.skipped.len() > SHOWN {
        println!(
            "  … and {} more skipped (see --json)",
            data.report.skipped.len() - SHOWN
        );
    }
    for p in data.report.decoded_as_latin1.iter().take(SHOWN) {
        println!("  decoded as Latin-1: {}", p.display());
    }
    if data.report.decoded_as_latin1.len() > SHOWN {
        println!(
            "  … and {} more decoded as Latin-1",
            data.report.decoded_as_latin1.len() - SHOWN
        );
    }
    Ok(())
}

/// Token counts with the model's tokenizer, one example at a time (no
/// padding), capped at `max_len`; `None` when the tokenizer is not
/// installed.
fn token_stats(
    data: &Dataset,
    source: &SourceArgs,
    max_len: usize,
) -> anyhow::Result<Option<TokenStats>> {
    let dir = source.dir.clone().unwrap_or_else(assets::default_dir);
    let path = dir.join(assets::MODEL_DIR).join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let tokenizer = fedsvd_model::Tokenizer::from_file(&path, max_len)?;
    let mut lengths = Vec::with_capacity(data.len());
    for e in &data.examples {
        let batch = match &e.text_pair {
            Some(pair) => tokenizer.encode_pairs(&[(e.text.as_str(), pair.as_str())])?,
            None => tokenizer.encode(&[e.text.as_str()])?,
        };
        lengths.push(batch.num_tokens());
    }
    Ok(TokenStats::of(&lengths, max_len))
}

#[derive(Serialize)]
struct PartitionOutput<'a> {
    dataset: &'a str,
    train: usize,
    test: usize,
    method: String,
    attempts: usize,
    report: &'a PartitionReport,
}

fn partition(args: &PartitionArgs) -> anyhow::Result<()> {
    let data = load(&args.source)?;
    let labels = data.labels();
    let split = train_test_split(&labels, args.test_fraction, args.seed)?;
    let (partition, method) = if args.iid {
        (
            partition_iid(&labels, &split.train, args.clients, args.seed)?,
            "iid".to_owned(),
        )
    } else {
        (
            partition_dirichlet(
                &labels,
                &split.train,
                args.clients,
                args.alpha,
                args.min_per_client,
                args.seed,
            )?,
            format!("dirichlet(alpha = {})", args.alpha),
        )
    };
    let report = PartitionReport::new(&partition, &labels, &data.label_names)?;
    if args.json {
        let out = PartitionOutput {
            dataset: &data.name,
            train: split.train.len(),
            test: split.test.len(),
            method,
            attempts: partition.attempts,
            report: &report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{}: {} train / {} held-out test, {} clients, {method}, seed {}",
            data.name,
            split.train.len(),
            split.test.len(),
            args.clients,
            args.seed
        );
        print!("{report}");
    }
    Ok(())
}
