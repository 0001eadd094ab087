//! OSTQuant's learned parameters (methods.md §6.2): the residual rotation `R1`, one `R2`
//! per KV head per layer, and five scaling vectors per layer — initialised so that the
//! transformed model computes exactly what the original computes.

use super::optim::{Adam, StiefelAdam};
use crate::loader::ModelConfig;
use crate::quant::transform::ResidualRotation;
use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The widths the transforms act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Widths {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub layers: usize,
}

impl Widths {
    pub fn of(c: &ModelConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            d_ff: c.intermediate_size,
            layers: c.num_hidden_layers,
        }
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One layer's parameters (host f32).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerParams {
    /// `[kv_heads, head_dim, head_dim]`, each orthogonal.
    pub r2: Vec<f32>,
    /// `[hidden]`: q/k/v input columns × s, input_layernorm ← 1/s.
    pub s_qkv: Vec<f32>,
    /// `[hidden]`: gate/up input columns × s, post_attention_layernorm ← 1/s.
    pub s_ug: Vec<f32>,
    /// `[kv_heads, head_dim / 2]`, tied across RoPE's pairs `(i, i + head_dim/2)` so that
    /// `q · k` is preserved exactly: k rows × s, q rows ÷ s.
    pub s_qk: Vec<f32>,
    /// `[kv_heads · head_dim]`: v rows ÷ s, o columns × s.
    pub s_ov: Vec<f32>,
    /// `[d_ff]`: up rows ÷ s, down columns × s.
    pub s_ud: Vec<f32>,
}

/// Every parameter of the transform.
#[derive(Debug, Clone, PartialEq)]
pub struct OstParams {
    pub widths: Widths,
    /// `[hidden, hidden]`, orthogonal.
    pub r1: Vec<f32>,
    pub layers: Vec<LayerParams>,
}

/// A random Hadamard rotation `D H / √n` as a dense row-major matrix.
pub(crate) fn random_hadamard(n: usize, seed: u64) -> Result<Vec<f32>> {
    let r = ResidualRotation::new(n, seed)?;
    let mut m = vec![0f32; n * n];
    (0..n).for_each(|i| m[i * n + i] = 1.0);
    r.rotate_rows(&mut m);
    Ok(m)
}

impl OstParams {
    /// Random-Hadamard rotations and unit scalings (the identity transform up to the
    /// rotations, which the model absorbs exactly).
    pub fn init(w: Widths, seed: u64) -> Result<Self> {
        let r1 =
            random_hadamard(w.hidden, seed).with_context(|| format!("R1 of order {}", w.hidden))?;
        let layers = (0..w.layers)
            .map(|l| {
                let mut r2 = Vec::with_capacity(w.kv_dim() * w.head_dim);
                for h in 0..w.kv_heads {
                    let s = seed
                        ^ ((l * w.kv_heads + h + 1) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    r2.extend(
                        random_hadamard(w.head_dim, s)
                            .with_context(|| format!("R2 of order {} (head_dim)", w.head_dim))?,
                    );
                }
                Ok(LayerParams {
                    r2,
                    s_qkv: vec![1.0; w.hidden],
                    s_ug: vec![1.0; w.hidden],
                    s_qk: vec![1.0; w.kv_dim() / 2],
                    s_ov: vec![1.0; w.kv_dim()],
                    s_ud: vec![1.0; w.d_ff],
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            widths: w,
            r1,
            layers,
        })
    }
}

/// Optimiser state of every parameter, in the order of [`OstParams`].
#[derive(Debug, Clone)]
pub struct OstOptimizer {
    pub r1: StiefelAdam,
    /// Per layer, per KV head.
    pub r2: Vec<Vec<StiefelAdam>>,
    /// Per layer: s_qkv, s_ug, s_qk, s_ov, s_ud.
    pub scales: Vec<[Adam; 5]>,
}

impl OstOptimizer {
    pub fn new(w: Widths) -> Self {
        Self {
            r1: StiefelAdam::new(w.hidden),
            r2: (0..w.layers)
                .map(|_| {
                    (0..w.kv_heads)
                        .map(|_| StiefelAdam::new(w.head_dim))
                        .collect()
                })
                .collect(),
            scales: (0..w.layers)
                .map(|_| {
                    [
                        Adam::new(w.hidden),
                        Adam::new(w.hidden),
                        Adam::new(w.kv_dim() / 2),
                        Adam::new(w.kv_dim()),
                        Adam::new(w.d_ff),
                    ]
                })
                .collect(),
        }
    }
}

/// Tensor names of a saved state.
fn layer_key(l: usize, what: &str) -> String {
    format!("layers.{l}.{what}")
}

fn t32(v: &[f32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
}

fn t64(v: &[f64]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
}

/// Save the parameters, and the optimiser state and step when given, to a safetensors
/// file (written to a temporary name, then renamed: an interrupted save leaves the last
/// complete one).
pub fn save(
    path: &Path,
    p: &OstParams,
    online_hadamard: bool,
    opt: Option<(&OstOptimizer, usize)>,
) -> Result<()> {
    let mut m: HashMap<String, Tensor> = HashMap::new();
    m.insert("r1".into(), t32(&p.r1)?);
    m.insert(
        "online_hadamard".into(),
        t32(&[f32::from(u8::from(online_hadamard))])?,
    );
    for (l, lp) in p.layers.iter().enumerate() {
        for (k, v) in [
            ("r2", &lp.r2),
            ("s_qkv", &lp.s_qkv),
            ("s_ug", &lp.s_ug),
            ("s_qk", &lp.s_qk),
            ("s_ov", &lp.s_ov),
            ("s_ud", &lp.s_ud),
        ] {
            m.insert(layer_key(l, k), t32(v)?);
        }
    }
    if let Some((o, step)) = opt {
        m.insert("step".into(), t64(&[step as f64])?);
        let mut stiefel = |name: String, s: &StiefelAdam| -> Result<()> {
            m.insert(format!("{name}.m"), t64(&s.m)?);
            m.insert(format!("{name}.v_t"), t64(&[s.v, s.t as f64])?);
            Ok(())
        };
        stiefel("adam.r1".into(), &o.r1)?;
        for (l, heads) in o.r2.iter().enumerate() {
            for (h, s) in heads.iter().enumerate() {
                stiefel(format!("adam.layers.{l}.r2.{h}"), s)?;
            }
        }
        for (l, a) in o.scales.iter().enumerate() {
            for (i, a) in a.iter().enumerate() {
                m.insert(format!("adam.layers.{l}.s{i}.m"), t64(&a.m)?);
                m.insert(format!("adam.layers.{l}.s{i}.v"), t64(&a.v)?);
                m.insert(format!("adam.layers.{l}.s{i}.t"), t64(&[a.t as f64])?);
            }
        }
    }
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(&m, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// What a saved state holds.
pub struct Saved {
    pub params: OstParams,
    /// The optimiser state and the number of steps done (a training run's save).
    pub progress: Option<(OstOptimizer, usize)>,
    /// The transforms were trained with R4.
    pub online_hadamard: bool,
}

/// The `n` values of tensor `k` of the file `path` (loaded as `m`).
fn values<T: candle_core::WithDType>(
    m: &HashMap<String, Tensor>,
    path: &Path,
    k: &str,
    n: usize,
) -> Result<Vec<T>> {
    let t = m
        .get(k)
        .with_context(|| format!("{} has no `{k}`", path.display()))?;
    let v = t.flatten_all()?.to_vec1::<T>()?;
    ensure!(
        v.len() == n,
        "{}: `{k}` has {} values, this model needs {n}",
        path.display(),
        v.len()
    );
    Ok(v)
}

/// Load what [`save`] wrote, checking every shape against `w`.
pub fn load(path: &Path, w: Widths) -> Result<Saved> {
    let m = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading OSTQuant transforms from {}", path.display()))?;
    let get32 = |k: &str, n: usize| values::<f32>(&m, path, k, n);
    let get64 = |k: &str, n: usize| values::<f64>(&m, path, k, n);
    let layers = (0..w.layers)
        .map(|l| {
            Ok(LayerParams {
                r2: get32(&layer_key(l, "r2"), w.kv_dim() * w.head_dim)?,
                s_qkv: get32(&layer_key(l, "s_qkv"), w.hidden)?,
                s_ug: get32(&layer_key(l, "s_ug"), w.hidden)?,
                s_qk: get32(&layer_key(l, "s_qk"), w.kv_dim() / 2)?,
                s_ov: get32(&layer_key(l, "s_ov"), w.kv_dim())?,
                s_ud: get32(&layer_key(l, "s_ud"), w.d_ff)?,
            })
        })
        .collect::<Result<_>>()?;
    let params = OstParams {
        widths: w,
        r1: get32("r1", w.hidden * w.hidden)?,
        layers,
    };
    let online_hadamard = get32("online_hadamard", 1)?[0] != 0.0;
    if !m.contains_key("step") {
        return Ok(Saved {
            params,
            progress: None,
            online_hadamard,
        });
    }
    let step = get64("step", 1)?[0] as usize;
    let stiefel = |name: &str, n: usize| -> Result<StiefelAdam> {
        let vt = get64(&format!("{name}.v_t"), 2)?;
        Ok(StiefelAdam {
            n,
            m: get64(&format!("{name}.m"), n * n)?,
            v: vt[0],
            t: vt[1] as u64,
        })
    };
    let mut opt = OstOptimizer::new(w);
    opt.r1 = stiefel("adam.r1", w.hidden)?;
    for (l, heads) in opt.r2.iter_mut().enumerate() {
        for (h, s) in heads.iter_mut().enumerate() {
            *s = stiefel(&format!("adam.layers.{l}.r2.{h}"), w.head_dim)?;
        }
    }
    for (l, a) in opt.scales.iter_mut().enumerate() {
        for (i, a) in a.iter_mut().enumerate() {
            let n = a.m.len();
            a.m = get64(&format!("adam.layers.{l}.s{i}.m"), n)?;
            a.v = get64(&format!("adam.layers.{l}.s{i}.v"), n)?;
            a.t = get64(&format!("adam.layers.{l}.s{i}.t"), 1)?[0] as u64;
        }
    }
    Ok(Saved {
        params,
        progress: Some((opt, step)),
        online_hadamard,
    })
}
