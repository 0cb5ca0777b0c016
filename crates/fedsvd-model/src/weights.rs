//! Loading the frozen encoder weights from `config.json` + `model.safetensors`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

use crate::config::BertConfig;
use crate::error::{Error, Result};

/// A dense layer `y = x Wᵀ + b` with `W` stored `[out, in]` row-major, as in
/// the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// Weight, `[d_out, d_in]` row-major.
    pub weight: Vec<f32>,
    /// Bias, `[d_out]`.
    pub bias: Vec<f32>,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
}

/// LayerNorm scale and shift.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    /// Scale (`weight` in the checkpoint).
    pub gamma: Vec<f32>,
    /// Shift (`bias` in the checkpoint).
    pub beta: Vec<f32>,
}

/// One encoder layer. The query, key and value projections are stored fused
/// (`[3h, h]`, rows query then key then value) so one GEMM computes all three.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// Fused query/key/value projection, `d_out = 3 * hidden`.
    pub qkv: Linear,
    /// `attention.output.dense`.
    pub attn_out: Linear,
    /// `attention.output.LayerNorm`.
    pub attn_ln: LayerNorm,
    /// `intermediate.dense`.
    pub intermediate: Linear,
    /// `output.dense`.
    pub output: Linear,
    /// `output.LayerNorm`.
    pub output_ln: LayerNorm,
}

/// The frozen weights of a BERT encoder (and its pretrained pooler, when the
/// checkpoint has one). Immutable after loading; share it with [`Arc`] so any
/// number of clients use one copy.
#[derive(Debug, Clone, PartialEq)]
pub struct BertWeights {
    /// The architecture.
    pub config: BertConfig,
    /// `[vocab, h]`.
    pub word_embeddings: Vec<f32>,
    /// `[max_positions, h]`.
    pub position_embeddings: Vec<f32>,
    /// `[type_vocab, h]`.
    pub token_type_embeddings: Vec<f32>,
    /// `embeddings.LayerNorm`.
    pub embeddings_ln: LayerNorm,
    /// The encoder layers in order.
    pub layers: Vec<LayerWeights>,
    /// `pooler.dense` (tanh on the first token), if the checkpoint has one.
    pub pooler: Option<Linear>,
}

/// Reads tensors by name (accepting a `bert.` prefix) and checks each
/// shape against the config.
struct Reader<'a> {
    st: SafeTensors<'a>,
    prefix: &'static str,
}

/// The values of an f32 tensor, refusing other dtypes and non-finite
/// values (both errors name the tensor).
pub(crate) fn f32_values(
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
) -> Result<Vec<f32>> {
    if view.dtype() != Dtype::F32 {
        return Err(Error::UnsupportedDtype {
            name: name.to_owned(),
            dtype: format!("{:?}", view.dtype()),
        });
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFiniteWeight {
            name: name.to_owned(),
        });
    }
    Ok(values)
}

/// Names `path` in an error about the contents of that file (its header
/// or one of its tensors); other errors pass through.
pub(crate) fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Safetensors { message, .. } => Error::Safetensors {
            path: path.to_owned(),
            message,
        },
        e @ (Error::MissingTensor { .. }
        | Error::ShapeMismatch { .. }
        | Error::UnsupportedDtype { .. }
        | Error::NonFiniteWeight { .. }) => Error::TensorInFile {
            path: path.to_owned(),
            source: Box::new(e),
        },
        other => other,
    }
}

impl Reader<'_> {
    fn has(&self, name: &str) -> bool {
        self.st.tensor(&format!("{}{name}", self.prefix)).is_ok()
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self
            .st
            .tensor(&format!("{}{name}", self.prefix))
            .map_err(|_| Error::MissingTensor {
                name: name.to_owned(),
            })?;
        if view.shape() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_owned(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        f32_values(&view, name)
    }

    fn linear(&self, name: &str, d_out: usize, d_in: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.get(&format!("{name}.weight"), &[d_out, d_in])?,
            bias: self.get(&format!("{name}.bias"), &[d_out])?,
            d_in,
            d_out,
        })
    }

    fn layer_norm(&self, name: &str, h: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            gamma: self.get(&format!("{name}.weight"), &[h])?,
            beta: self.get(&format!("{name}.bias"), &[h])?,
        })
    }
}

impl BertWeights {
    /// Loads `config.json` and `model.safetensors` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Arc<Self>> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        Self::from_safetensors_file(config, &dir.join("model.safetensors"))
    }

    /// Loads the weights from a safetensors file for the given config.
    pub fn from_safetensors_file(config: BertConfig, path: &Path) -> Result<Arc<Self>> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_safetensors_bytes(config, &bytes).map_err(|e| in_file(path, e))
    }

    /// Loads the weights from the bytes of a safetensors file. Tensor names
    /// are those of Hugging Face `BertModel`, optionally prefixed `bert.`;
    /// tensors the encoder does not use (`embeddings.position_ids`, a
    /// masked-LM head, ...) are ignored.
    pub fn from_safetensors_bytes(config: BertConfig, bytes: &[u8]) -> Result<Arc<Self>> {
        config.validate()?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
            path: Default::default(),
            message: e.to_string(),
        })?;
        let prefix = if st.tensor("embeddings.word_embeddings.weight").is_err()
            && st.tensor("bert.embeddings.word_embeddings.weight").is_ok()
        {
            "bert."
        } else {
            ""
        };
        let r = Reader { st, prefix };
        let h = config.hidden_size;
        let ff = config.intermediate_size;
        let word_embeddings =
            r.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position_embeddings = r.get(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let token_type_embeddings = r.get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let embeddings_ln = r.layer_norm("embeddings.LayerNorm", h)?;
        // No capacity from the config: `num_hidden_layers` is a number in a
        // user's file, and the tensors of every layer must be found first.
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let q = r.linear(&format!("{p}.attention.self.query"), h, h)?;
            let k = r.linear(&format!("{p}.attention.self.key"), h, h)?;
            let v = r.linear(&format!("{p}.attention.self.value"), h, h)?;
            let mut weight = q.weight;
            weight.extend_from_slice(&k.weight);
            weight.extend_from_slice(&v.weight);
            let mut bias = q.bias;
            bias.extend_from_slice(&k.bias);
            bias.extend_from_slice(&v.bias);
            layers.push(LayerWeights {
                qkv: Linear {
                    weight,
                    bias,
                    d_in: h,
                    d_out: 3 * h,
                },
                attn_out: r.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_ln: r.layer_norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                intermediate: r.linear(&format!("{p}.intermediate.dense"), ff, h)?,
                output: r.linear(&format!("{p}.output.dense"), h, ff)?,
                output_ln: r.layer_norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        let pooler = if r.has("pooler.dense.weight") || r.has("pooler.dense.bias") {
            Some(r.linear("pooler.dense", h, h)?)
        } else {
            None
        };
        Ok(Arc::new(BertWeights {
            config,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_ln,
            layers,
            pooler,
        }))
    }

    /// Number of frozen parameters held.
    pub fn num_parameters(&self) -> usize {
        let lin = |l: &Linear| l.weight.len() + l.bias.len();
        let ln = |l: &LayerNorm| l.gamma.len() + l.beta.len();
        self.word_embeddings.len()
            + self.position_embeddings.len()
            + self.token_type_embeddings.len()
            + ln(&self.embeddings_ln)
            + self
                .layers
                .iter()
                .map(|l| {
                    lin(&l.qkv)
                        + lin(&l.attn_out)
                        + ln(&l.attn_ln)
                        + lin(&l.intermediate)
                        + lin(&l.output)
                        + ln(&l.output_ln)
                })
                .sum::<usize>()
            + self.pooler.as_ref().map_or(0, lin)
    }
}

/// Serializes named f32 tensors to safetensors bytes, for tests and tools that
/// write small checkpoints.
pub fn write_safetensors(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let mut views = HashMap::new();
    for (n, s, b) in &bytes {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| {
            Error::Safetensors {
                path: Default::default(),
                message: format!("tensor `{n}`: {e}"),
            }
        })?;
        views.insert(n.clone(), view);
    }
    safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
        path: Default::default(),
        message: e.to_string(),
    })
}
