//! The codebook layout for layers on a per-layer table (NUPES' power grid): a weight is
//! `scale[group, row] · codebook[code]`.
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `<name>.qweight` | I32 | `[N, ceil(K·b/32)]` | each output row's `K` codes, an LSB-first `b`-bit stream (the shared bitstream of [`super::bits`]) |
//! | `<name>.scales` | F16 | `[G, N]` | scale `M` of each group of input columns and row |
//! | `<name>.g_idx` | I32 | `[K]` | group of each input column (`k / group_size` unless act-order) |
//! | `<name>.codebook` | F32 | `[2^b]` | unit value of each code |
//! | `<name>.exponent` | F32 | `[1]` | the power grid's exponent `a` the codebook was built with (informational: the codebook defines the weights) |
//!
//! `quantization_config` holds `quant_method` [`CODEBOOK_METHOD`], `bits`, `group_size`
//! (`-1` per channel), `codebook` (`power`), `levels` and `layout` (`row-codes-v1`).

use super::bits;
use super::validate::check_scales;
use crate::loader::WeightStore;
use crate::model::LinearSpec;
use crate::quant::{CodebookQuantizedLinear, GroupSize};
use anyhow::{anyhow, ensure, Context, Result};
use half::f16;

/// `quantization_config.quant_method` of a model holding codebook layers.
pub const CODEBOOK_METHOD: &str = "bitsmith_codebook";

/// The `quantization_config` of a codebook model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CodebookConfig {
    /// Always [`CODEBOOK_METHOD`].
    pub quant_method: String,
    pub bits: u8,
    /// Columns per scale group, `-1` per channel.
    pub group_size: i64,
    /// How the tables were made: `power`.
    pub codebook: String,
    /// The power grid's levels: `symmetric` or `all`.
    pub levels: String,
    /// Always `row-codes-v1`.
    pub layout: String,
    pub meta: serde_json::Value,
}

impl CodebookConfig {
    /// The config of a packed model's `config.json`.
    pub fn from_model_config(raw: &serde_json::Value) -> Result<Self> {
        let q = raw
            .get("quantization_config")
            .ok_or_else(|| anyhow!("config.json has no quantization_config"))?;
        let c: Self = serde_json::from_value(q.clone())
            .context("reading the codebook quantization_config")?;
        ensure!(
            (2..=8).contains(&c.bits),
            "quantization_config.bits {} is outside 2..=8",
            c.bits
        );
        GroupSize::from_i64(c.group_size)?;
        ensure!(
            c.layout == "row-codes-v1",
            "quantization_config.layout `{}` is not known (bitsmith reads row-codes-v1)",
            c.layout
        );
        Ok(c)
    }

    pub fn group_size(&self) -> GroupSize {
        GroupSize::from_i64(self.group_size).expect("checked on read")
    }
}

/// The packed codes of `q`: `[N, ceil(K·b/32)]` words.
pub fn pack_codes(q: &CodebookQuantizedLinear) -> Vec<u32> {
    let (n, k) = (q.out_features, q.in_features);
    let words = bits::packed_words(k, q.bits);
    let mut out = vec![0u32; n * words];
    for (r, row) in out.chunks_mut(words.max(1)).enumerate().take(n) {
        bits::pack_into(q.codes[r * k..(r + 1) * k].iter().copied(), q.bits, row);
    }
    out
}

/// Read the codebook tensors of `spec` back, validated: shapes from the config, every
/// scale finite and non-zero, the codebook finite, every `g_idx` a group.
pub fn read_codebook_linear(
    store: &WeightStore,
    spec: &LinearSpec,
    cfg: &CodebookConfig,
) -> Result<CodebookQuantizedLinear> {
    let (n, k, b) = (spec.out_features, spec.in_features, cfg.bits);
    let name = |leaf: &str| format!("{}.{leaf}", spec.name);
    let file = || {
        store
            .file_of(&name("qweight"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let group_size = cfg.group_size();
    let n_groups = group_size.n_groups(k);
    let words = bits::packed_words(k, b);
    let read = || -> Result<CodebookQuantizedLinear> {
        let qweight = store.i32_vec(&name("qweight"), &[n, words])?;
        let scales: Vec<f16> = store
            .f32_vec(&name("scales"), &[n_groups, n])?
            .into_iter()
            .map(f16::from_f32)
            .collect();
        check_scales(&scales, n)?;
        let table = store.f32_vec(&name("codebook"), &[1usize << b])?;
        if let Some(c) = table.iter().position(|t| !t.is_finite()) {
            anyhow::bail!("codebook entry {c} is {} (not finite)", table[c]);
        }
        let exponent = store.f32_vec(&name("exponent"), &[1])?[0];
        let g_idx = store.i32_vec(&name("g_idx"), &[k])?;
        if let Some(j) = g_idx.iter().position(|&g| g < 0 || g as usize >= n_groups) {
            anyhow::bail!(
                "g_idx[{j}] = {} is not one of the {n_groups} groups",
                g_idx[j]
            );
        }
        let mut codes = vec![0u8; n * k];
        for (r, row) in codes.chunks_mut(k.max(1)).enumerate().take(n) {
            let stream: Vec<u32> = qweight[r * words..(r + 1) * words]
                .iter()
                .map(|&x| x as u32)
                .collect();
            for (j, c) in row.iter_mut().enumerate() {
                *c = bits::get(&stream, b, j);
            }
        }
        Ok(CodebookQuantizedLinear {
            out_features: n,
            in_features: k,
            bits: b,
            group_size,
            exponent,
            table,
            codes,
            scales,
            g_idx: g_idx.into_iter().map(|g| g as u32).collect(),
        })
    };
    read().with_context(|| format!("reading `{}` from {}", spec.name, file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_pack_row_by_row() {
        let (n, k) = (3, 37);
        for b in 2..=8u8 {
            let codes: Vec<u8> = (0..n * k)
                .map(|i| ((i * 13 + 5) % (1 << b)) as u8)
                .collect();
            let q = CodebookQuantizedLinear {
                out_features: n,
                in_features: k,
                bits: b,
                group_size: GroupSize::PerChannel,
                exponent: 0.5,
                table: vec![0.0; 1 << b],
                codes: codes.clone(),
                scales: vec![f16::ONE; n],
                g_idx: vec![0; k],
            };
            let words = pack_codes(&q);
            let w = bits::packed_words(k, b);
            assert_eq!(words.len(), n * w);
            for r in 0..n {
                let row = bits::unpack(&words[r * w..(r + 1) * w], b, k);
                assert_eq!(row, &codes[r * k..(r + 1) * k], "bits {b} row {r}");
            }
        }
    }
}
