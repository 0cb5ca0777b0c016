//! `fedsvd embed TEXT... [--json]`: mean-pooled, L2-normalized sentence
//! embeddings from the local all-MiniLM-L6-v2.

use anyhow::Context;
use clap::Args;
use fedsvd_model::{BertWeights, HeadConfig, LoraConfig, Model, Pooling, Tokenizer, minilm_dir};

/// Arguments of `fedsvd embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The texts to embed.
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Print JSON (`{"model","dim","embeddings":[[..],..],"cosine":[[..],..]}`).
    #[arg(long)]
    pub json: bool,
    /// Truncate every text to this many tokens ([CLS] and [SEP] included).
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let dir = minilm_dir()?;
    let weights = BertWeights::from_dir(&dir).context("loading the MiniLM weights")?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), args.max_len)?;
    let head = HeadConfig {
        num_labels: 1,
        pooling: Pooling::Mean,
    };
    let model = Model::new(weights, LoraConfig::default(), head)?;
    let batch = tokenizer.encode(&args.texts)?;
    let emb = model.embed(None, &batch)?;
    let dim = model.weights().config.hidden_size;
    let rows: Vec<&[f32]> = emb.chunks_exact(dim).collect();
    let cos: Vec<Vec<f32>> = rows
        .iter()
        .map(|a| {
            rows.iter()
                .map(|b| a.iter().zip(*b).map(|(x, y)| x * y).sum())
                .collect()
        })
        .collect();
    if args.json {
        let out = serde_json::json!({
            "model": fedsvd_model::MINILM_DIR,
            "dim": dim,
            "embeddings": rows,
            "cosine": cos,
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for (i, (text, row)) in args.texts.iter().zip(&rows).enumerate() {
            let head: Vec<String> = row[..8.min(dim)]
                .iter()
                .map(|v| format!("{v:.5}"))
                .collect();
            println!(
                "[{i}] {text:?} ({} tokens): [{}, ...] (dim {dim})",
                batch.lengths[i],
                head.join(", ")
            );
        }
        if rows.len() > 1 {
            println!("cosine similarity:");
            for (i, r) in cos.iter().enumerate() {
                let cells: Vec<String> = r.iter().map(|v| format!("{v:>7.4}")).collect();
                println!("[{i}] {}", cells.join(" "));
            }
        }
    }
    Ok(())
}
