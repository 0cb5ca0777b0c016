//! LoRA configuration, the trainable state (adapters and classifier head) and
//! the fixed flat layout of the trainable parameters.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::BertConfig;
use crate::error::{Error, Result};

/// A projection inside an encoder layer that can carry a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `attention.self.query`.
    Query,
    /// `attention.self.key`.
    Key,
    /// `attention.self.value`.
    Value,
    /// `attention.output.dense`.
    AttentionOutput,
    /// `intermediate.dense`.
    Intermediate,
    /// `output.dense`.
    Output,
}

impl Target {
    /// All targets in the canonical order used for the parameter layout.
    pub const ALL: [Target; 6] = [
        Target::Query,
        Target::Key,
        Target::Value,
        Target::AttentionOutput,
        Target::Intermediate,
        Target::Output,
    ];

    /// The module name as in Hugging Face / PEFT (`query`, `attention.output.dense`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Target::Query => "query",
            Target::Key => "key",
            Target::Value => "value",
            Target::AttentionOutput => "attention.output.dense",
            Target::Intermediate => "intermediate.dense",
            Target::Output => "output.dense",
        }
    }

    /// Parses a module name (also accepts the short forms `attention_output`,
    /// `intermediate`, `output`).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "query" | "q" => Target::Query,
            "key" | "k" => Target::Key,
            "value" | "v" => Target::Value,
            "attention.output.dense" | "attention_output" | "attn_out" => Target::AttentionOutput,
            "intermediate.dense" | "intermediate" => Target::Intermediate,
            "output.dense" | "output" => Target::Output,
            other => {
                return Err(Error::InvalidOption(format!(
                    "unknown LoRA target `{other}` (expected one of query, key, value, \
                     attention.output.dense, intermediate.dense, output.dense)"
                )));
            }
        })
    }

    /// `(d_in, d_out)` of the projection.
    pub fn dims(self, config: &BertConfig) -> (usize, usize) {
        let h = config.hidden_size;
        let ff = config.intermediate_size;
        match self {
            Target::Query | Target::Key | Target::Value | Target::AttentionOutput => (h, h),
            Target::Intermediate => (h, ff),
            Target::Output => (ff, h),
        }
    }
}

/// LoRA hyper-parameters and which parameters train.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of every adapter.
    pub rank: usize,
    /// `lora_alpha`; the adapter output is scaled by `alpha / rank`.
    pub alpha: f32,
    /// Dropout probability on the adapter input, applied in training only.
    pub dropout: f32,
    /// Which projections of every layer carry an adapter.
    pub targets: Vec<Target>,
    /// Whether the `A` factors are trainable.
    pub train_a: bool,
    /// Whether the `B` factors are trainable.
    pub train_b: bool,
    /// Whether the classifier head (weight and bias) is trainable.
    pub train_head: bool,
}

impl Default for LoraConfig {
    /// The paper's defaults: r = 8, alpha = 8, dropout 0.05 on query and
    /// value, both factors trainable, head frozen.
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 8.0,
            dropout: 0.05,
            targets: vec![Target::Query, Target::Value],
            train_a: true,
            train_b: true,
            train_head: false,
        }
    }
}

impl LoraConfig {
    /// The adapter scale `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Targets sorted in canonical order without duplicates.
    pub fn sorted_targets(&self) -> Vec<Target> {
        let mut t = self.targets.clone();
        t.sort();
        t.dedup();
        t
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidOption("LoRA rank must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::InvalidOption(format!(
                "LoRA alpha must be positive, got {}",
                self.alpha
            )));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(Error::InvalidOption(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// How the encoder output becomes the classifier input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The pretrained pooler: `tanh(W h_[CLS] + b)` (as `BertForSequenceClassification`).
    ClsPooler,
    /// Mean of the final hidden states over the real tokens (what sentence
    /// embedding checkpoints such as all-MiniLM-L6-v2 were trained for).
    Mean,
}

/// The classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadConfig {
    /// Number of classes.
    pub num_labels: usize,
    /// Pooling of the encoder output.
    pub pooling: Pooling,
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            num_labels: 2,
            pooling: Pooling::ClsPooler,
        }
    }
}

/// One adapter: `W ← W + s·B·A` on one projection of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// The layer index.
    pub layer: usize,
    /// The projection.
    pub target: Target,
    /// Input width of the projection.
    pub d_in: usize,
    /// Output width of the projection.
    pub d_out: usize,
    /// `A`, `[rank, d_in]` row-major.
    pub a: Vec<f32>,
    /// `B`, `[d_out, rank]` row-major.
    pub b: Vec<f32>,
}

/// The per-client trainable state: every adapter's `A` and `B` and the
/// classifier head. The frozen encoder is shared separately.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraState {
    /// The rank of every adapter.
    pub rank: usize,
    /// Adapters ordered by layer, then by [`Target::ALL`] order.
    pub adapters: Vec<Adapter>,
    /// Classifier weight, `[num_labels, hidden]` row-major.
    pub head_weight: Vec<f32>,
    /// Classifier bias, `[num_labels]`.
    pub head_bias: Vec<f32>,
}

impl LoraState {
    /// Fresh state: `A ~ U(±1/√d_in)` (PEFT's Kaiming-uniform with a = √5),
    /// `B = 0`, classifier weight `N(0, 0.02²)` and bias 0 (Hugging Face's
    /// BERT initialization), all drawn from `seed`.
    pub fn init(
        config: &BertConfig,
        lora: &LoraConfig,
        head: &HeadConfig,
        seed: u64,
    ) -> Result<Self> {
        lora.validate()?;
        if head.num_labels == 0 {
            return Err(Error::InvalidOption("num_labels must be at least 1".into()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut adapters = Vec::new();
        for layer in 0..config.num_hidden_layers {
            for target in lora.sorted_targets() {
                let (d_in, d_out) = target.dims(config);
                let bound = 1.0 / (d_in as f32).sqrt();
                let a = (0..lora.rank * d_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                adapters.push(Adapter {
                    layer,
                    target,
                    d_in,
                    d_out,
                    a,
                    b: vec![0.0; d_out * lora.rank],
                });
            }
        }
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::InvalidOption(e.to_string()))?;
        let head_weight = (0..head.num_labels * config.hidden_size)
            .map(|_| normal.sample(&mut rng))
            .collect();
        Ok(LoraState {
            rank: lora.rank,
            adapters,
            head_weight,
            head_bias: vec![0.0; head.num_labels],
        })
    }

    /// The adapter on `target` of `layer`, if there is one.
    pub fn adapter(&self, layer: usize, target: Target) -> Option<&Adapter> {
        self.adapters
            .iter()
            .find(|a| a.layer == layer && a.target == target)
    }

    /// Mutable access to the adapter on `target` of `layer`.
    pub fn adapter_mut(&mut self, layer: usize, target: Target) -> Option<&mut Adapter> {
        self.adapters
            .iter_mut()
            .find(|a| a.layer == layer && a.target == target)
    }

    fn adapter_index(&self, layer: usize, target: Target) -> Result<usize> {
        self.adapters
            .iter()
            .position(|a| a.layer == layer && a.target == target)
            .ok_or_else(|| {
                Error::InvalidOption(format!(
                    "layer {layer} has no adapter on `{}`",
                    target.name()
                ))
            })
    }

    /// Replaces `A` of one adapter (`[rank, d_in]` row-major).
    pub fn set_a(&mut self, layer: usize, target: Target, a: &[f32]) -> Result<()> {
        let i = self.adapter_index(layer, target)?;
        let ad = &mut self.adapters[i];
        check_values(
            &format!("A of layer {layer} {}", target.name()),
            ad.a.len(),
            a,
        )?;
        ad.a.copy_from_slice(a);
        Ok(())
    }

    /// Replaces `B` of one adapter (`[d_out, rank]` row-major).
    pub fn set_b(&mut self, layer: usize, target: Target, b: &[f32]) -> Result<()> {
        let i = self.adapter_index(layer, target)?;
        let ad = &mut self.adapters[i];
        check_values(
            &format!("B of layer {layer} {}", target.name()),
            ad.b.len(),
            b,
        )?;
        ad.b.copy_from_slice(b);
        Ok(())
    }
}

fn check_values(what: &str, expected: usize, values: &[f32]) -> Result<()> {
    if values.len() != expected {
        return Err(Error::LengthMismatch {
            what: what.to_owned(),
            expected,
            found: values.len(),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite(what.to_owned()));
    }
    Ok(())
}

/// What a slot of the flat trainable vector holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `A` of adapter number `.0` (index into [`LoraState::adapters`]).
    A(usize),
    /// `B` of adapter number `.0`.
    B(usize),
    /// Classifier weight.
    HeadWeight,
    /// Classifier bias.
    HeadBias,
}

/// One trainable tensor in the flat layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSlot {
    /// What it is.
    pub kind: ParamKind,
    /// A readable name, e.g. `layer.3.value.lora_B`.
    pub name: String,
    /// Offset in the flat vector.
    pub offset: usize,
    /// `[rows, cols]` of the tensor (row-major).
    pub shape: [usize; 2],
}

impl ParamSlot {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Whether the tensor is empty (never, for a valid model).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The fixed order of the trainable parameters in flat vectors (gradients,
/// updates, uploads): adapters in [`LoraState::adapters`] order, for each its
/// `A` (if trainable) then its `B` (if trainable); then the classifier weight
/// and bias (if trainable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    /// The slots in order.
    pub slots: Vec<ParamSlot>,
    /// Total length.
    pub len: usize,
}

impl ParamLayout {
    /// The layout for a state built with `lora` and `head`.
    pub fn new(state: &LoraState, lora: &LoraConfig, num_labels: usize, hidden: usize) -> Self {
        let mut slots = Vec::new();
        let mut offset = 0;
        let mut push = |kind, name: String, shape: [usize; 2]| {
            slots.push(ParamSlot {
                kind,
                name,
                offset,
                shape,
            });
            offset += shape[0] * shape[1];
        };
        for (i, ad) in state.adapters.iter().enumerate() {
            let base = format!("layer.{}.{}", ad.layer, ad.target.name());
            if lora.train_a {
                push(
                    ParamKind::A(i),
                    format!("{base}.lora_A"),
                    [state.rank, ad.d_in],
                );
            }
            if lora.train_b {
                push(
                    ParamKind::B(i),
                    format!("{base}.lora_B"),
                    [ad.d_out, state.rank],
                );
            }
        }
        if lora.train_head {
            push(
                ParamKind::HeadWeight,
                "classifier.weight".into(),
                [num_labels, hidden],
            );
            push(
                ParamKind::HeadBias,
                "classifier.bias".into(),
                [num_labels, 1],
            );
        }
        ParamLayout { slots, len: offset }
    }

    /// The values of one slot in `state`.
    pub fn get<'a>(&self, state: &'a LoraState, kind: ParamKind) -> &'a [f32] {
        match kind {
            ParamKind::A(i) => &state.adapters[i].a,
            ParamKind::B(i) => &state.adapters[i].b,
            ParamKind::HeadWeight => &state.head_weight,
            ParamKind::HeadBias => &state.head_bias,
        }
    }

    fn get_mut<'a>(&self, state: &'a mut LoraState, kind: ParamKind) -> &'a mut [f32] {
        match kind {
            ParamKind::A(i) => &mut state.adapters[i].a,
            ParamKind::B(i) => &mut state.adapters[i].b,
            ParamKind::HeadWeight => &mut state.head_weight,
            ParamKind::HeadBias => &mut state.head_bias,
        }
    }

    fn check_state(&self, state: &LoraState) -> Result<()> {
        for s in &self.slots {
            let found = match s.kind {
                ParamKind::A(i) | ParamKind::B(i) if i >= state.adapters.len() => 0,
                k => self.get(state, k).len(),
            };
            if found != s.len() {
                return Err(Error::LengthMismatch {
                    what: format!("state tensor {}", s.name),
                    expected: s.len(),
                    found,
                });
            }
        }
        Ok(())
    }

    /// The trainable parameters of `state` as one vector.
    pub fn flatten(&self, state: &LoraState) -> Result<Vec<f32>> {
        self.check_state(state)?;
        let mut out = Vec::with_capacity(self.len);
        for s in &self.slots {
            out.extend_from_slice(self.get(state, s.kind));
        }
        Ok(out)
    }

    /// Writes a flat vector back into `state`.
    pub fn unflatten(&self, state: &mut LoraState, flat: &[f32]) -> Result<()> {
        self.check_state(state)?;
        check_values("flat parameter vector", self.len, flat)?;
        for s in &self.slots {
            self.get_mut(state, s.kind)
                .copy_from_slice(&flat[s.offset..s.offset + s.len()]);
        }
        Ok(())
    }

    /// `θ ← θ − lr · g` for a flat gradient (or any update direction) `g`.
    pub fn apply_update(&self, state: &mut LoraState, grad: &[f32], lr: f32) -> Result<()> {
        self.check_state(state)?;
        check_values("gradient", self.len, grad)?;
        if !lr.is_finite() {
            return Err(Error::NonFinite("learning rate".into()));
        }
        for s in &self.slots {
            let g = &grad[s.offset..s.offset + s.len()];
            for (p, g) in self.get_mut(state, s.kind).iter_mut().zip(g) {
                *p -= lr * g;
            }
        }
        Ok(())
    }
}
