//! Per-block checkpoints of a calibrated quantization run, so an interrupted run resumes
//! from its last finished block with the same result. A checkpoint folder holds `key.json`
//! (everything that determines the result: model, revision, calibration, options), one
//! `block-NNNNN.safetensors` per finished block (codes, scales, zeros, `g_idx`, column
//! losses) and `activations.safetensors` (the next block's inputs). Every file is written
//! to a temporary name and renamed, so a kill leaves the previous state intact.

use crate::loader::WeightStore;
use crate::model::spec::BLOCK_LINEARS;
use crate::model::LinearSpec;
use crate::pack::model::{f16_bytes, u32_bytes, OutTensor};
use crate::quant::{LayerCodes, LayerResult, MixedQuantizedLinear, QuantizedLinear, UniformGrid};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Storage, Tensor};
use half::f16;
use safetensors::Dtype;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub struct Checkpoint {
    dir: PathBuf,
    key: Value,
}

/// State restored from a checkpoint.
pub struct Resume {
    pub layers: Vec<(String, LayerResult)>,
    pub inputs: Vec<Tensor>,
    pub next_block: usize,
}

fn write_atomic(
    path: &Path,
    tensors: &BTreeMap<String, OutTensor>,
    meta: HashMap<String, String>,
) -> Result<()> {
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| anyhow!("writing checkpoint {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}

impl Checkpoint {
    pub fn new(dir: PathBuf, key: Value) -> Self {
        Self { dir, key }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn block_path(&self, block: usize) -> PathBuf {
        self.dir.join(format!("block-{block:05}.safetensors"))
    }

    /// A checkpoint written with the same key, or `None` (a stale one is discarded).
    pub fn load(&self, grid: UniformGrid, device: &Device) -> Result<Option<Resume>> {
        let key_path = self.dir.join("key.json");
        let Ok(text) = std::fs::read_to_string(&key_path) else {
            return Ok(None);
        };
        let stored: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let act_path = self.dir.join("activations.safetensors");
        if stored != self.key || !act_path.is_file() {
            std::fs::remove_dir_all(&self.dir).ok();
            return Ok(None);
        }
        let acts = WeightStore::open(std::slice::from_ref(&act_path))?;
        // the header is already parsed by the memory map; no second read of the file
        let next_block: usize = acts
            .metadata("next_block")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("checkpoint {} lacks next_block", act_path.display()))?;
        let mut names: Vec<&str> = acts.names().collect();
        names.sort_by_key(|n| {
            n.trim_start_matches("x.")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        let inputs = names
            .iter()
            .map(|n| {
                let shape = acts.info(n)?.shape.clone();
                Ok(Tensor::from_vec(acts.f32_vec(n, &shape)?, shape, device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut layers = Vec::new();
        for block in 0..next_block {
            let store = WeightStore::open(&[self.block_path(block)])?;
            let mut stems: Vec<String> = store
                .names()
                .filter_map(|n| n.strip_suffix(".codes").map(str::to_string))
                .collect();
            // restore in execution order (q, k, v, o, gate, up, down)
            stems.sort_by_key(|s| BLOCK_LINEARS.iter().position(|suffix| s.ends_with(suffix)));
            for stem in stems {
                layers.push((stem.clone(), read_layer(&store, &stem, grid)?));
            }
        }
        Ok(Some(Resume {
            layers,
            inputs,
            next_block,
        }))
    }

    /// Record a finished block and the inputs of the next one.
    pub fn save_block(
        &self,
        block: usize,
        layers: &[(LinearSpec, LayerResult)],
        next_inputs: &[Tensor],
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::write(
            self.dir.join("key.json"),
            serde_json::to_string_pretty(&self.key)?,
        )?;
        let mut t = BTreeMap::new();
        for (spec, r) in layers {
            let n = &spec.name;
            let mut put = |leaf: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| {
                t.insert(
                    format!("{n}.{leaf}"),
                    OutTensor {
                        dtype,
                        shape,
                        data: data.into(),
                    },
                );
            };
            // both kinds store codes `[out, in]` and scales/zeros `[groups, out]`
            let (rows, cols, codes, scales, zeros) = match &r.codes {
                LayerCodes::Uniform(q) => {
                    (q.out_features, q.in_features, &q.codes, &q.scales, &q.zeros)
                }
                LayerCodes::Mixed(q) => {
                    (q.out_features, q.in_features, &q.codes, &q.scales, &q.zeros)
                }
            };
            let groups = scales.len() / rows.max(1);
            put("codes", Dtype::U8, vec![rows, cols], codes.clone());
            put("scales", Dtype::F16, vec![groups, rows], f16_bytes(scales));
            put("zeros", Dtype::U8, vec![groups, rows], zeros.clone());
            match &r.codes {
                LayerCodes::Uniform(q) => {
                    put(
                        "g_idx",
                        Dtype::U32,
                        vec![q.in_features],
                        u32_bytes(&q.g_idx),
                    );
                }
                LayerCodes::Mixed(q) => {
                    put("widths", Dtype::U8, vec![q.in_features], q.widths.clone());
                    put("sym", Dtype::U8, vec![1], vec![q.sym as u8]);
                    // 0 = one range per row and width
                    let g = q.group_size.unwrap_or(0) as u32;
                    put(
                        "mixed_group_size",
                        Dtype::U32,
                        vec![1],
                        g.to_le_bytes().to_vec(),
                    );
                }
            }
            if let Some(l) = &r.column_loss {
                let bytes: Vec<u8> = l.iter().flat_map(|x| x.to_le_bytes()).collect();
                t.insert(
                    format!("{n}.column_loss"),
                    OutTensor {
                        dtype: Dtype::F64,
                        shape: vec![l.len()],
                        data: bytes.into(),
                    },
                );
            }
        }
        write_atomic(&self.block_path(block), &t, HashMap::new())?;
        // borrow every segment's f32 data instead of copying ~all activations once more
        let contiguous: Vec<Tensor> = next_inputs
            .iter()
            .map(|x| x.contiguous())
            .collect::<candle_core::Result<_>>()?;
        let guards: Vec<_> = contiguous.iter().map(|x| x.storage_and_layout()).collect();
        let mut acts = BTreeMap::new();
        for (i, ((storage, layout), x)) in guards.iter().zip(&contiguous).enumerate() {
            let Storage::Cpu(cpu) = &**storage else {
                bail!("checkpoints hold CPU activations only")
            };
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| anyhow!("activation {i} is not contiguous"))?;
            let data = f32_le_bytes(&cpu.as_slice::<f32>()?[start..end]);
            acts.insert(
                format!("x.{i}"),
                OutTensor {
                    dtype: Dtype::F32,
                    shape: x.dims().to_vec(),
                    data: data.into(),
                },
            );
        }
        let meta = HashMap::from([("next_block".to_string(), (block + 1).to_string())]);
        write_atomic(&self.dir.join("activations.safetensors"), &acts, meta)
    }
}

/// The little-endian bytes of an f32 slice, without copying.
#[cfg(target_endian = "little")]
fn f32_le_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns, u8 has alignment 1, and on a
    // little-endian target the in-memory bytes are the little-endian encoding.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn read_layer(store: &WeightStore, stem: &str, grid: UniformGrid) -> Result<LayerResult> {
    let (ci, codes) = store.raw(&format!("{stem}.codes"))?;
    let [n, k] = ci.shape[..] else {
        bail!("checkpoint tensor {stem}.codes is not 2-D")
    };
    let (si, scales) = store.raw(&format!("{stem}.scales"))?;
    let groups = si.shape[0];
    let (_, zeros) = store.raw(&format!("{stem}.zeros"))?;
    let column_loss =
        store
            .contains(&format!("{stem}.column_loss"))
            .then(|| -> Result<Vec<f64>> {
                let (_, b) = store.raw(&format!("{stem}.column_loss"))?;
                Ok(b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect())
            });
    anyhow::ensure!(
        scales.len() == 2 * groups * n,
        "checkpoint tensor {stem}.scales has the wrong size"
    );
    let scales: Vec<f16> = scales
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect();
    let codes = if store.contains(&format!("{stem}.widths")) {
        let (_, widths) = store.raw(&format!("{stem}.widths"))?;
        let (_, sym) = store.raw(&format!("{stem}.sym"))?;
        let (_, g) = store.raw(&format!("{stem}.mixed_group_size"))?;
        let g = u32::from_le_bytes(g.try_into().map_err(|_| {
            anyhow::anyhow!("checkpoint tensor {stem}.mixed_group_size is not one u32")
        })?);
        LayerCodes::Mixed(MixedQuantizedLinear {
            out_features: n,
            in_features: k,
            sym: sym.first() == Some(&1),
            widths: widths.to_vec(),
            group_size: (g > 0).then_some(g as usize),
            codes: codes.to_vec(),
            scales,
            zeros: zeros.to_vec(),
        })
    } else {
        let (_, g_idx) = store.raw(&format!("{stem}.g_idx"))?;
        LayerCodes::Uniform(QuantizedLinear {
            out_features: n,
            in_features: k,
            grid,
            codes: codes.to_vec(),
            scales,
            zeros: zeros.to_vec(),
            g_idx: g_idx
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        })
    };
    Ok(LayerResult {
        codes,
        column_loss: column_loss.transpose()?,
    })
}
