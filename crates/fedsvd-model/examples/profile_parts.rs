//! Times the parts of a training step on MiniLM (for tuning).

use std::time::Instant;

use fedsvd_model::{Batch, BertWeights, HeadConfig, LoraConfig, Model, Target, minilm_dir};

fn cpu_s() -> f64 {
    // utime + stime of this process from /proc/self/stat (clock ticks of 10 ms).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let weights = BertWeights::from_dir(&minilm_dir()?)?;
    let lora = LoraConfig {
        targets: vec![Target::Query, Target::Value],
        train_a: false,
        ..LoraConfig::default()
    };
    let model = Model::new(weights, lora, HeadConfig::default())?;
    let state = model.init_state(0)?;
    let ids: Vec<Vec<u32>> = (0..32u32)
        .map(|i| {
            (0..64u32)
                .map(|t| 2000 + (i * 131 + t * 17) % 20000)
                .collect()
        })
        .collect();
    let batch = Batch::from_sequences(&ids, &vec![vec![0; 64]; 32], 0)?;
    let labels: Vec<usize> = (0..32).map(|i| i % 2).collect();
    for _ in 0..3 {
        let t = Instant::now();
        let c0 = cpu_s();
        let _ = model.logits(&state, &batch)?;
        let fwd = t.elapsed().as_secs_f64();
        let fwd_cpu = cpu_s() - c0;
        let c0 = cpu_s();
        let t = Instant::now();
        let g = model.gradients(&state, &batch, &labels, Some(1))?;
        let fb = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = g.clipped_sum(2.0)?;
        let clip = t.elapsed().as_secs_f64();
        let fb_cpu = cpu_s() - c0;
        println!(
            "eval forward {fwd:.3}s (cpu {fwd_cpu:.2}s), forward+backward+clip {:.3}s (cpu {fb_cpu:.2}s), clipped sum {clip:.3}s",
            fb + clip
        );
    }
    Ok(())
}
