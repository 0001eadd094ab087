//! The mixed-width layout for BAQ layers (a bit width per input column). Columns are
//! sorted into runs of equal width, each run stored like a GPTQ linear at its own width
//! (its columns in order, cut into range groups), so an unpacker (and a kernel) handles one
//! width at a time:
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `<name>.col_perm` | I32 | `[K]` | original column of each stored position: pruned columns first, then runs by ascending width, original order inside a run |
//! | `<name>.col_widths` | U8 | `[K]` | width of each original column (0 = pruned, stores nothing) |
//! | `<name>.w<b>.qweight` | I32 | `[ceil(K_b·b/32), N]` | codes of the run's `K_b` columns, packed along the input dimension (GPTQ packing) |
//! | `<name>.w<b>.scales` | F16 | `[G_b, N]` | scale of each range group of the run and row |
//! | `<name>.w<b>.qzeros` | I32 | `[G_b, ceil(N·b/32)]` | zero point of each range group and row (true value, GPTQ v2) |
//!
//! Every width present gets one run; `K_b` is its number of columns and `G_b` its number of
//! range groups: `ceil(K_b / group_size)` (groups of `group_size` consecutive stored
//! columns, the last one possibly smaller), or 1 without a group size (one range per row and
//! width). `quantization_config.group_size` holds the group size (-1 for none).

use super::bits;

/// `quantization_config.quant_method` of a model holding mixed-width layers.
pub const MIXED_METHOD: &str = "bitsmith-mixed";

/// The `quantization_config` of a mixed-width model (the layout is the tensors'; these
/// keys record how the widths were chosen).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MixedConfig {
    /// Always [`MIXED_METHOD`].
    pub quant_method: String,
    /// The budget: average bits per weight.
    pub bits: f64,
    pub sym: bool,
    pub allowed_bits: Vec<u8>,
    pub theta: f64,
    /// `layer` or `model`.
    pub allocate: String,
    /// Range groups inside each width run, `-1` for one range per row and width.
    pub group_size: i64,
    /// `column-runs-v1` (uniform runs with zero points), or [`MIXED_CODEBOOK_LAYOUT`]
    /// (each width on a power codebook: [`super::mixed_codebook`]).
    pub layout: String,
    /// The codebook layout's levels (`extended`, `all`, `symmetric`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levels: Option<String>,
    pub meta: serde_json::Value,
}

/// `quantization_config.layout` of BAQ's widths on power codebooks.
pub const MIXED_CODEBOOK_LAYOUT: &str = "column-runs-codebook-v1";

impl MixedConfig {
    /// The mixed-width `quantization_config` of a model's `config.json`, checked.
    pub fn from_model_config(raw: &serde_json::Value) -> Result<Self> {
        let q = raw
            .get("quantization_config")
            .ok_or_else(|| anyhow!("config.json has no quantization_config"))?;
        let c: Self = serde_json::from_value(q.clone())
            .with_context(|| format!("reading the {MIXED_METHOD} quantization_config"))?;
        ensure!(
            c.quant_method == MIXED_METHOD,
            "quantization_config.quant_method `{}` is not {MIXED_METHOD}",
            c.quant_method
        );
        ensure!(
            c.layout == "column-runs-v1" || c.layout == MIXED_CODEBOOK_LAYOUT,
            "quantization_config.layout `{}` is not known (bitsmith reads column-runs-v1 and \
             {MIXED_CODEBOOK_LAYOUT})",
            c.layout
        );
        c.range_groups()?;
        Ok(c)
    }

    /// Columns per range group inside each width run; `None`: one range per row and width.
    pub fn range_groups(&self) -> Result<Option<usize>> {
        match self.group_size {
            -1 => Ok(None),
            g if g > 0 => Ok(Some(g as usize)),
            g => bail!("quantization_config.group_size {g} is not a positive size or -1"),
        }
    }

    /// Whether every width is on a power codebook (no zero points).
    pub fn is_codebook(&self) -> bool {
        self.layout == MIXED_CODEBOOK_LAYOUT
    }

    /// The method that chose the widths (`meta.method`), for summaries.
    pub fn method(&self) -> &str {
        self.meta["method"].as_str().unwrap_or("mixed")
    }
}
use crate::quant::{mixed_groups, MixedQuantizedLinear};
use anyhow::{anyhow, bail, ensure, Context, Result};
use half::f16;

/// One run of equal-width columns, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedRun {
    pub bits: u8,
    /// `[ceil(K_b·b/32), N]`.
    pub qweight: Vec<u32>,
    /// `[G_b, N]`.
    pub scales: Vec<f16>,
    /// `[G_b, ceil(N·b/32)]`.
    pub qzeros: Vec<u32>,
}

/// The tensors of one mixed-width linear.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedTensors {
    pub col_perm: Vec<i32>,
    pub col_widths: Vec<u8>,
    pub runs: Vec<MixedRun>,
}

impl MixedTensors {
    pub fn from_quantized(q: &MixedQuantizedLinear) -> Self {
        let (n, k) = (q.out_features, q.in_features);
        let groups = q.groups();
        let mut runs: Vec<MixedRun> = Vec::new();
        let mut g = 0;
        while g < groups.n_groups() {
            let b = groups.group_width[g];
            let first = g;
            while g < groups.n_groups() && groups.group_width[g] == b {
                g += 1;
            }
            let cols = &groups.order[groups.group_start[first]..groups.group_start[g]];
            let rows = bits::packed_words(cols.len(), b);
            let mut qweight = vec![0u32; rows * n];
            let mut column = vec![0u32; rows];
            for r in 0..n {
                column.iter_mut().for_each(|w| *w = 0);
                bits::pack_into(cols.iter().map(|&j| q.codes[r * k + j]), b, &mut column);
                for (i, &w) in column.iter().enumerate() {
                    qweight[i * n + r] = w;
                }
            }
            let params = first * n..g * n;
            runs.push(MixedRun {
                bits: b,
                qweight,
                scales: q.scales[params.clone()].to_vec(),
                qzeros: (first..g)
                    .flat_map(|gi| bits::pack(&q.zeros[gi * n..(gi + 1) * n], b))
                    .collect(),
            });
        }
        Self {
            col_perm: groups.order.iter().map(|&j| j as i32).collect(),
            col_widths: q.widths.clone(),
            runs,
        }
    }

    /// Unpack, validating shapes, the permutation and the widths.
    pub fn to_quantized(
        &self,
        out_features: usize,
        in_features: usize,
        sym: bool,
        group_size: Option<usize>,
    ) -> Result<MixedQuantizedLinear> {
        let (n, k) = (out_features, in_features);
        ensure!(
            self.col_perm.len() == k && self.col_widths.len() == k,
            "col_perm/col_widths must have {k} entries"
        );
        ensure!(
            self.col_widths.iter().all(|&b| b <= 8),
            "column widths must be 0..=8"
        );
        ensure!(group_size != Some(0), "group size must be positive");
        let groups = mixed_groups(&self.col_widths, group_size);
        ensure!(
            self.col_perm
                .iter()
                .zip(&groups.order)
                .all(|(&p, &o)| p as i64 == o as i64),
            "col_perm is not the permutation of 0..{k} that sorts columns by width"
        );
        let mut codes = vec![0u8; n * k];
        let mut scales = Vec::with_capacity(groups.n_groups() * n);
        let mut zeros = Vec::with_capacity(groups.n_groups() * n);
        let mut g = 0;
        let mut expected_bits = 1u8;
        for run in &self.runs {
            let b = run.bits;
            ensure!(
                (expected_bits..=8).contains(&b),
                "runs must have distinct ascending widths (got {b})"
            );
            expected_bits = b + 1;
            ensure!(
                g < groups.n_groups() && groups.group_width[g] == b,
                "run of width {b} has no columns"
            );
            let first = g;
            while g < groups.n_groups() && groups.group_width[g] == b {
                g += 1;
            }
            let n_groups = g - first;
            let cols = &groups.order[groups.group_start[first]..groups.group_start[g]];
            let rows = bits::packed_words(cols.len(), b);
            ensure!(
                run.qweight.len() == rows * n,
                "w{b}.qweight has {} words, expected {rows}x{n}",
                run.qweight.len()
            );
            ensure!(
                run.scales.len() == n_groups * n,
                "w{b}.scales has {} entries, expected {n_groups}x{n}",
                run.scales.len()
            );
            let zero_words = bits::packed_words(n, b);
            ensure!(
                run.qzeros.len() == n_groups * zero_words,
                "w{b}.qzeros has {} words, expected {n_groups}x{zero_words}",
                run.qzeros.len()
            );
            let mut column = vec![0u32; rows];
            for r in 0..n {
                for (i, w) in column.iter_mut().enumerate() {
                    *w = run.qweight[i * n + r];
                }
                for (t, &j) in cols.iter().enumerate() {
                    codes[r * k + j] = bits::get(&column, b, t);
                }
            }
            scales.extend_from_slice(&run.scales);
            for gi in 0..n_groups {
                let words = &run.qzeros[gi * zero_words..(gi + 1) * zero_words];
                zeros.extend((0..n).map(|r| bits::get(words, b, r)));
            }
        }
        ensure!(
            g == groups.n_groups(),
            "runs cover {g} of {} range groups",
            groups.n_groups()
        );
        let q = MixedQuantizedLinear {
            out_features: n,
            in_features: k,
            sym,
            widths: self.col_widths.clone(),
            group_size,
            codes,
            scales,
            zeros,
        };
        super::validate::check_mixed(&q)?;
        Ok(q)
    }

    /// Stored bytes: codes, scales, zeros, permutation and widths.
    pub fn byte_len(&self) -> usize {
        let runs: usize = self
            .runs
            .iter()
            .map(|r| 4 * r.qweight.len() + 2 * r.scales.len() + 4 * r.qzeros.len())
            .sum();
        runs + 4 * self.col_perm.len() + self.col_widths.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gptq_mixed;

    #[test]
    fn mixed_layout_round_trips() {
        let (n, k) = (40, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| (((i * 7919) % 1013) as f32 / 1013.0 - 0.45) * 0.1)
            .collect();
        let h: Vec<f32> = (0..k * k)
            .map(|i| {
                if i / k == i % k {
                    1.0 + (i % 7) as f32
                } else {
                    0.01
                }
            })
            .collect();
        for pattern in [
            vec![0u8, 2, 3, 4, 5, 6, 7, 8],
            vec![3],
            vec![2, 4],
            vec![1, 8, 0],
        ] {
            let widths: Vec<u8> = (0..k)
                .map(|j| pattern[(j * 5 + 1) % pattern.len()])
                .collect();
            for (sym, group) in [
                (false, None),
                (true, None),
                (false, Some(8)),
                (true, Some(5)),
            ] {
                let q = gptq_mixed(&w, n, k, &h, &widths, group, sym, 0.01, 32)
                    .unwrap()
                    .quantized;
                let t = MixedTensors::from_quantized(&q);
                let back = t.to_quantized(n, k, sym, group).unwrap();
                assert_eq!(back, q, "{pattern:?} sym {sym} group {group:?}");
                let code_bits: usize = widths.iter().map(|&b| b as usize).sum::<usize>() * n;
                assert!(8 * t.byte_len() >= code_bits);
            }
        }
    }

    #[test]
    fn corrupt_permutation_is_an_error() {
        let (n, k) = (4, 32);
        let w = vec![0.01f32; n * k];
        let h: Vec<f32> = (0..k * k)
            .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
            .collect();
        let q = gptq_mixed(&w, n, k, &h, &vec![4; k], None, false, 0.01, 32)
            .unwrap()
            .quantized;
        let mut t = MixedTensors::from_quantized(&q);
        t.col_perm[1] = t.col_perm[0];
        assert!(t
            .to_quantized(n, k, false, None)
            .unwrap_err()
            .to_string()
            .contains("permutation"));
    }
}
