//! The mixed-codebook layout: BAQ's widths (a width per input column) with every width on
//! its own power codebook (NUPES' table). The columns are arranged exactly as in the
//! mixed-width layout ([`super::mixed`]: pruned columns first, then runs by ascending width,
//! each run cut into range groups) and the codes packed the same way; a run has one f16
//! scale per range group and row and no zero points, and its width's table:
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `<name>.col_perm` | I32 | `[K]` | original column of each stored position |
//! | `<name>.col_widths` | U8 | `[K]` | width of each original column (0 = pruned, 1 is not used) |
//! | `<name>.w<b>.qweight` | I32 | `[ceil(K_b·b/32), N]` | codes of the run's `K_b` columns, packed along the input dimension |
//! | `<name>.w<b>.scales` | F16 | `[G_b, N]` | scale `M` of each range group of the run and row |
//! | `<name>.w<b>.codebook` | F32 | `[2^b]` | unit value of each code of width `b` |
//! | `<name>.w<b>.exponent` | F32 | `[1]` | the power grid's exponent `a` that table was built with (informational) |
//!
//! A weight is `scale[group, row] · codebook_b[code]`. `quantization_config` is the
//! mixed-width one ([`super::MixedConfig`]) with `layout` [`super::mixed::MIXED_CODEBOOK_LAYOUT`]
//! and `levels`.

use super::mixed::{MixedRun, MixedTensors};
use super::validate::check_scales;
use crate::loader::WeightStore;
use crate::model::LinearSpec;
use crate::quant::{
    mixed_groups, MixedCodebookQuantizedLinear, MixedQuantizedLinear, WidthCodebook,
};
use anyhow::{bail, ensure, Context, Result};
use half::f16;

/// One width's run as stored: codes, scales and its table.
pub struct CodebookRun {
    pub bits: u8,
    /// `[ceil(K_b·b/32), N]`.
    pub qweight: Vec<u32>,
    /// `[G_b, N]`.
    pub scales: Vec<f16>,
    pub table: Vec<f32>,
    pub exponent: f32,
}

/// The tensors of one mixed-codebook linear.
pub struct MixedCodebookTensors {
    pub col_perm: Vec<i32>,
    pub col_widths: Vec<u8>,
    pub runs: Vec<CodebookRun>,
}

/// The layer as a mixed-width layer with zero points of 0: the two layouts share the
/// column order and the code packing, which [`MixedTensors`] implements.
fn as_mixed(q: &MixedCodebookQuantizedLinear) -> MixedQuantizedLinear {
    MixedQuantizedLinear {
        out_features: q.out_features,
        in_features: q.in_features,
        sym: false,
        widths: q.widths.clone(),
        group_size: q.group_size,
        codes: q.codes.clone(),
        scales: q.scales.clone(),
        zeros: vec![0; q.scales.len()],
    }
}

impl MixedCodebookTensors {
    pub fn from_quantized(q: &MixedCodebookQuantizedLinear) -> Result<Self> {
        check_mixed_codebook(q)?;
        let t = MixedTensors::from_quantized(&as_mixed(q));
        let runs = t
            .runs
            .into_iter()
            .map(|r| {
                let table = q.table_of(r.bits).expect("checked: a table per width");
                CodebookRun {
                    bits: r.bits,
                    qweight: r.qweight,
                    scales: r.scales,
                    table: table.table.clone(),
                    exponent: table.exponent,
                }
            })
            .collect();
        Ok(Self {
            col_perm: t.col_perm,
            col_widths: t.col_widths,
            runs,
        })
    }

    /// Unpack, validating shapes, the permutation, the widths and the tables.
    pub fn into_quantized(
        self,
        out_features: usize,
        in_features: usize,
        group_size: Option<usize>,
    ) -> Result<MixedCodebookQuantizedLinear> {
        let n = out_features;
        let mut tables = Vec::with_capacity(self.runs.len());
        let mut runs = Vec::with_capacity(self.runs.len());
        for r in self.runs {
            let groups = r.scales.len() / n.max(1);
            tables.push(WidthCodebook {
                bits: r.bits,
                exponent: r.exponent,
                table: r.table,
            });
            runs.push(MixedRun {
                bits: r.bits,
                qweight: r.qweight,
                scales: r.scales,
                qzeros: vec![0; groups * super::bits::packed_words(n, r.bits)],
            });
        }
        let m = MixedTensors {
            col_perm: self.col_perm,
            col_widths: self.col_widths,
            runs,
        }
        .to_quantized(out_features, in_features, false, group_size)?;
        let q = MixedCodebookQuantizedLinear {
            out_features,
            in_features,
            widths: m.widths,
            group_size,
            codes: m.codes,
            scales: m.scales,
            tables,
        };
        check_mixed_codebook(&q)?;
        Ok(q)
    }
}

/// What a mixed-codebook layer must satisfy: sizes, widths 0 or 2..=8, one finite table of
/// `2^b` entries per width present (ascending), codes inside their width, scales finite
/// and non-zero.
pub fn check_mixed_codebook(q: &MixedCodebookQuantizedLinear) -> Result<()> {
    let (n, k) = (q.out_features, q.in_features);
    ensure!(
        q.codes.len() == n * k && q.widths.len() == k,
        "{} codes and {} widths for a {n}x{k} layer",
        q.codes.len(),
        q.widths.len()
    );
    if let Some(j) = q.widths.iter().position(|&b| b == 1 || b > 8) {
        bail!(
            "column {j} has width {}; a power codebook has 2 to 8 bits (0: pruned)",
            q.widths[j]
        );
    }
    ensure!(q.group_size != Some(0), "group size must be positive");
    let groups = mixed_groups(&q.widths, q.group_size);
    ensure!(
        q.scales.len() == groups.n_groups() * n,
        "{} scales, expected {} range groups x {n} rows",
        q.scales.len(),
        groups.n_groups()
    );
    check_scales(&q.scales, n)?;
    let mut present: Vec<u8> = q.widths.iter().copied().filter(|&b| b > 0).collect();
    present.sort_unstable();
    present.dedup();
    let have: Vec<u8> = q.tables.iter().map(|t| t.bits).collect();
    ensure!(
        have == present,
        "codebooks for widths {have:?}, but the columns have widths {present:?}"
    );
    for t in &q.tables {
        ensure!(
            t.table.len() == 1 << t.bits,
            "the {}-bit codebook has {} entries, expected {}",
            t.bits,
            t.table.len(),
            1 << t.bits
        );
        if let Some(c) = t.table.iter().position(|v| !v.is_finite()) {
            bail!("{}-bit codebook entry {c} is {} (not finite)", t.bits, t.table[c]);
        }
    }
    for (i, &c) in q.codes.iter().enumerate() {
        let b = q.widths[i % k];
        if (b == 0 && c != 0) || (b > 0 && (c as u32) >= 1u32 << b) {
            bail!(
                "code {c} (row {}, column {}) does not fit the column's {b} bits",
                i / k,
                i % k
            );
        }
    }
    Ok(())
}

/// Read the mixed-codebook tensors of `spec` back, validated.
pub fn read_mixed_codebook_linear(
    store: &WeightStore,
    spec: &LinearSpec,
    group_size: Option<usize>,
) -> Result<MixedCodebookQuantizedLinear> {
    let (n, k) = (spec.out_features, spec.in_features);
    let name = |leaf: &str| format!("{}.{leaf}", spec.name);
    let file = || {
        store
            .file_of(&name("col_widths"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let read = || -> Result<MixedCodebookQuantizedLinear> {
        ensure!(
            group_size != Some(0),
            "quantization_config.group_size 0 is not a size"
        );
        let (col_perm, col_widths) = super::model::read_column_order(store, &spec.name, k)?;
        if let Some(j) = col_widths.iter().position(|&b| b == 1) {
            bail!(
                "tensor `{}` gives column {j} width {}; a power codebook has 2 to 8 bits",
                name("col_widths"),
                col_widths[j]
            );
        }
        let mut runs = Vec::new();
        for b in 2..=8u8 {
            let kb = col_widths.iter().filter(|&&w| w == b).count();
            if kb == 0 {
                continue;
            }
            let groups = group_size.map_or(1, |g| kb.div_ceil(g));
            let rows = super::bits::packed_words(kb, b);
            let qweight = store.i32_vec(&name(&format!("w{b}.qweight")), &[rows, n])?;
            let scales = store.f32_vec(&name(&format!("w{b}.scales")), &[groups, n])?;
            let table = store.f32_vec(&name(&format!("w{b}.codebook")), &[1usize << b])?;
            let exponent = store.f32_vec(&name(&format!("w{b}.exponent")), &[1])?[0];
            runs.push(CodebookRun {
                bits: b,
                qweight: qweight.into_iter().map(|x| x as u32).collect(),
                scales: scales.into_iter().map(f16::from_f32).collect(),
                table,
                exponent,
            });
        }
        MixedCodebookTensors {
            col_perm,
            col_widths,
            runs,
        }
        .into_quantized(n, k, group_size)
    };
    read().with_context(|| format!("reading `{}` from {}", spec.name, file()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::baq::codebook::gptq_mixed_power;
    use crate::quant::baq::layer::stored_bits;
    use crate::quant::grid::{PowerLevels, RangeFit};

    fn layer(n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                let v = ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
                v * v * v * 0.4
            })
            .collect();
        let h: Vec<f32> = (0..k * k)
            .map(|i| if i / k == i % k { 1.0 + (i % 7) as f32 } else { 0.01 })
            .collect();
        (w, h)
    }

    #[test]
    fn mixed_codebook_layout_round_trips() {
        let (n, k) = (24, 80);
        let (w, h) = layer(n, k);
        for pattern in [vec![0u8, 2, 3, 4, 8], vec![3], vec![2, 5]] {
            let widths: Vec<u8> = (0..k)
                .map(|j| pattern[(j * 7 + 3) % pattern.len()])
                .collect();
            for group in [None, Some(8), Some(5)] {
                let q = gptq_mixed_power(
                    &w,
                    n,
                    k,
                    &h,
                    &widths,
                    group,
                    PowerLevels::Extended,
                    RangeFit::MinMax,
                    0.01,
                    32,
                )
                .unwrap()
                .quantized;
                let t = MixedCodebookTensors::from_quantized(&q).unwrap();
                // BAQ's stored budget counts exactly what is written
                let bytes: usize = 4 * t.col_perm.len()
                    + t.col_widths.len()
                    + t.runs
                        .iter()
                        .map(|r| 4 * r.qweight.len() + 2 * r.scales.len() + 4 * r.table.len() + 4)
                        .sum::<usize>();
                assert_eq!(
                    8 * bytes as u64,
                    stored_bits(&widths, n, group, true),
                    "{pattern:?} group {group:?}"
                );
                let back = t.into_quantized(n, k, group).unwrap();
                assert_eq!(back, q, "{pattern:?} group {group:?}");
            }
        }
    }

    #[test]
    fn a_missing_or_short_table_is_an_error() {
        let (n, k) = (4, 32);
        let (w, h) = layer(n, k);
        let widths: Vec<u8> = (0..k).map(|j| if j % 2 == 0 { 2 } else { 4 }).collect();
        let q = gptq_mixed_power(
            &w,
            n,
            k,
            &h,
            &widths,
            None,
            PowerLevels::Extended,
            RangeFit::MinMax,
            0.01,
            32,
        )
        .unwrap()
        .quantized;
        let mut missing = q.clone();
        missing.tables.remove(0);
        let e = check_mixed_codebook(&missing).unwrap_err().to_string();
        assert!(e.contains("codebooks for widths [4]"), "{e}");
        let mut short = q.clone();
        short.tables[1].table.pop();
        let e = check_mixed_codebook(&short).unwrap_err().to_string();
        assert!(e.contains("4-bit codebook has 15 entries"), "{e}");
        let mut nan = q;
        nan.tables[0].table[1] = f32::NAN;
        assert!(check_mixed_codebook(&nan).is_err());
    }
}
