//! The GPTQ tensor layout (formats.md §1): `qweight`, `qzeros`, `scales`, `g_idx`, and the
//! `quantization_config` block that describes them.

use super::bits;
use crate::quant::{GroupSize, QuantizedLinear, UniformGrid};
use anyhow::{anyhow, bail, ensure, Result};
use half::f16;
use serde_json::{json, Value};

/// How zero points are stored (formats.md §1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroConvention {
    /// `"gptq"`: stored = zero − 1 (mod 2^b). The most widely readable.
    V1,
    /// `"gptq_v2"`: stored = zero.
    V2,
}

impl ZeroConvention {
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "gptq",
            Self::V2 => "gptq_v2",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gptq" => Ok(Self::V1),
            "gptq_v2" => Ok(Self::V2),
            other => {
                bail!("unknown GPTQ checkpoint_format `{other}` (expected `gptq` or `gptq_v2`)")
            }
        }
    }

    fn store(self, zero: u8, bits: u8) -> u8 {
        let mask = ((1u16 << bits) - 1) as u8;
        match self {
            Self::V1 => zero.wrapping_sub(1) & mask,
            Self::V2 => zero,
        }
    }

    fn load(self, stored: u8, bits: u8) -> u8 {
        let mask = ((1u16 << bits) - 1) as u8;
        match self {
            Self::V1 => stored.wrapping_add(1) & mask,
            Self::V2 => stored,
        }
    }
}

/// The four tensors of one quantized linear, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqTensors {
    /// `[ceil(K/32)·b, N]`, row-major.
    pub qweight: Vec<u32>,
    /// `[n_groups, ceil(N/32)·b]`.
    pub qzeros: Vec<u32>,
    /// `[n_groups, N]`.
    pub scales: Vec<f16>,
    /// `[K]`.
    pub g_idx: Vec<i32>,
}

impl GptqTensors {
    pub fn qweight_shape(k: usize, n: usize, bits: u8) -> [usize; 2] {
        [bits::packed_words(k, bits), n]
    }

    pub fn qzeros_shape(n: usize, n_groups: usize, bits: u8) -> [usize; 2] {
        [n_groups, bits::packed_words(n, bits)]
    }

    /// Pack a quantized layer. In v1 a zero point of 0 is first moved to 1 with the
    /// group's codes one higher (the same weights; see [`v1_safe_zeros`]); a group that
    /// cannot move is an error.
    pub fn from_quantized(q: &QuantizedLinear, zeros: ZeroConvention) -> Result<Self> {
        let q = match zeros {
            ZeroConvention::V1 => v1_safe_zeros(q)?,
            ZeroConvention::V2 => std::borrow::Cow::Borrowed(q),
        };
        let q = q.as_ref();
        let (n, k, b) = (q.out_features, q.in_features, q.grid.bits);
        let rows = bits::packed_words(k, b);
        // pack each output column's input-ordered codes, then lay words out [row, n]
        let mut qweight = vec![0u32; rows * n];
        let mut column = vec![0u32; rows];
        for col in 0..n {
            column.iter_mut().for_each(|w| *w = 0);
            bits::pack_into(
                q.codes[col * k..(col + 1) * k].iter().copied(),
                b,
                &mut column,
            );
            for (r, &w) in column.iter().enumerate() {
                qweight[r * n + col] = w;
            }
        }
        let n_groups = q.n_groups();
        let zcols = bits::packed_words(n, b);
        let mut qzeros = vec![0u32; n_groups * zcols];
        for g in 0..n_groups {
            let stored = q.zeros[g * n..(g + 1) * n]
                .iter()
                .map(|&z| zeros.store(z, b));
            bits::pack_into(stored, b, &mut qzeros[g * zcols..(g + 1) * zcols]);
        }
        Ok(Self {
            qweight,
            qzeros,
            scales: q.scales.clone(),
            g_idx: q.g_idx.iter().map(|&g| g as i32).collect(),
        })
    }

    /// Unpack into codes/scales/zeros, validating every shape and index.
    pub fn to_quantized(
        &self,
        out_features: usize,
        in_features: usize,
        grid: UniformGrid,
        zeros: ZeroConvention,
    ) -> Result<QuantizedLinear> {
        let (n, k, b) = (out_features, in_features, grid.bits);
        let rows = bits::packed_words(k, b);
        ensure!(
            self.qweight.len() == rows * n,
            "qweight has {} words, expected {rows}x{n}",
            self.qweight.len()
        );
        ensure!(
            self.g_idx.len() == k,
            "g_idx has {} entries, expected {k}",
            self.g_idx.len()
        );
        ensure!(
            n > 0 && self.scales.len().is_multiple_of(n),
            "scales length {} is not a multiple of {n}",
            self.scales.len()
        );
        let n_groups = self.scales.len() / n;
        let zcols = bits::packed_words(n, b);
        ensure!(
            self.qzeros.len() == n_groups * zcols,
            "qzeros has {} words, expected {n_groups}x{zcols}",
            self.qzeros.len()
        );
        let g_idx = self
            .g_idx
            .iter()
            .map(|&g| {
                u32::try_from(g)
                    .ok()
                    .filter(|&g| (g as usize) < n_groups)
                    .ok_or_else(|| anyhow!("g_idx value {g} is outside 0..{n_groups}"))
            })
            .collect::<Result<Vec<u32>>>()?;
        let mut codes = vec![0u8; n * k];
        let mut column = vec![0u32; rows];
        for col in 0..n {
            for (r, w) in column.iter_mut().enumerate() {
                *w = self.qweight[r * n + col];
            }
            for (j, c) in codes[col * k..(col + 1) * k].iter_mut().enumerate() {
                *c = bits::get(&column, b, j);
            }
        }
        let mut zero_values = vec![0u8; n_groups * n];
        for g in 0..n_groups {
            let words = &self.qzeros[g * zcols..(g + 1) * zcols];
            for col in 0..n {
                zero_values[g * n + col] = zeros.load(bits::get(words, b, col), b);
            }
        }
        let q = QuantizedLinear {
            out_features: n,
            in_features: k,
            grid,
            codes,
            scales: self.scales.clone(),
            zeros: zero_values,
            g_idx,
        };
        super::validate::check_uniform(&q)?;
        Ok(q)
    }
}

/// `q` with no zero point 0, for v1 checkpoints. v1 stores `zero − 1`, so zero 0 is the
/// field `2^b − 1`, and gptqmodel's v1 → v2 conversion adds 1 to every field of a packed
/// word at once (`convert_gptq_v1_to_v2_format_module`, gptqmodel/utils/model.py): that
/// field carries into its neighbour, another row's zero point. bitsmith's grids never fit
/// zero 0 (`UniformGrid::params_from_range`); a layer from elsewhere that has one is moved
/// to zero 1 with its codes one higher, `s·((c+1) − 1) = s·(c − 0)`, exact when no code
/// of the group is already the top one. Otherwise the group has no v1 form with its scale:
/// an error that says so (gptq_v2 stores it as it is).
fn v1_safe_zeros(q: &QuantizedLinear) -> Result<std::borrow::Cow<'_, QuantizedLinear>> {
    if !q.zeros.contains(&0) {
        return Ok(std::borrow::Cow::Borrowed(q));
    }
    let (n, k) = (q.out_features, q.in_features);
    let top = q.grid.max_code();
    let mut moved = q.clone();
    for (i, _) in q.zeros.iter().enumerate().filter(|(_, &z)| z == 0) {
        let (g, row) = (i / n, i % n);
        let codes = &mut moved.codes[row * k..(row + 1) * k];
        let columns = || (0..k).filter(|&j| q.g_idx[j] as usize == g);
        if let Some(j) = columns().find(|&j| codes[j] == top) {
            bail!(
                "zero point 0 (group {g}, row {row}) has no exact GPTQ v1 form: gptqmodel                  misreads a stored v1 zero of 0, and the group cannot move to zero 1 because                  input column {j} already holds the top code {top}; write                  --checkpoint-format gptq_v2"
            );
        }
        columns().for_each(|j| codes[j] += 1);
        moved.zeros[i] = 1;
    }
    Ok(std::borrow::Cow::Owned(moved))
}

/// The `quantization_config` of a GPTQ checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqConfig {
    pub bits: u8,
    pub group_size: GroupSize,
    pub sym: bool,
    pub desc_act: bool,
    pub lm_head: bool,
    pub zeros: ZeroConvention,
    /// Producer details for `meta` (method name, options).
    pub meta: Value,
}

impl GptqConfig {
    pub fn grid(&self) -> Result<UniformGrid> {
        UniformGrid::new(self.bits, self.group_size, self.sym)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size.as_i64(),
            "desc_act": self.desc_act,
            "sym": self.sym,
            "lm_head": self.lm_head,
            "checkpoint_format": self.zeros.name(),
            "pack_dtype": "int32",
            "meta": self.meta,
        })
    }

    /// Read `quantization_config` from a model's config.json; `None` for a float model.
    pub fn from_model_config(raw: &Value) -> Result<Option<Self>> {
        let Some(q) = raw.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        ensure!(
            q.is_object(),
            "quantization_config must be a JSON object, found {q}"
        );
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method != "gptq" {
            bail!("quantization_config.quant_method `{method}` is not supported (bitsmith reads `gptq`)");
        }
        let int = |k: &str| match q.get(k) {
            None | Some(Value::Null) => bail!("quantization_config is missing the integer `{k}`"),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| anyhow!("quantization_config.{k} must be an integer, found {v}")),
        };
        // a flag of the wrong type is an error, not silently its default: `"sym": "false"`
        // read as true would decode every weight with the wrong zero point
        let flag = |k: &str, default: bool| -> Result<bool> {
            match q.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    anyhow!("quantization_config.{k} must be true or false, found {v}")
                }),
            }
        };
        if q.get("dynamic")
            .is_some_and(|d| d.as_object().is_some_and(|o| !o.is_empty()))
        {
            bail!("quantization_config.dynamic (per-module overrides) is not supported yet");
        }
        let bits = int("bits")?;
        let bits = u8::try_from(bits)
            .map_err(|_| anyhow!("quantization_config.bits {bits} is out of range"))?;
        let format = match q.get("checkpoint_format").or_else(|| q.get("format")) {
            None | Some(Value::Null) => "gptq",
            Some(v) => v.as_str().ok_or_else(|| {
                anyhow!("quantization_config.checkpoint_format must be a string, found {v}")
            })?,
        };
        let cfg = Self {
            bits,
            group_size: GroupSize::from_i64(int("group_size")?)?,
            sym: flag("sym", true)?,
            desc_act: flag("desc_act", false)?,
            lm_head: flag("lm_head", false)?,
            zeros: ZeroConvention::parse(format)?,
            meta: q.get("meta").cloned().unwrap_or(Value::Null),
        };
        cfg.grid()?;
        Ok(Some(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{LayerToQuantize, Rtn};

    fn layer(n: usize, k: usize, bits: u8, g: GroupSize, sym: bool) -> QuantizedLinear {
        let w: Vec<f32> = (0..n * k)
            .map(|i| (((i * 7919) % 1013) as f32 / 1013.0 - 0.4) * 0.1)
            .collect();
        let grid = UniformGrid::new(bits, g, sym).unwrap();
        Rtn { grid }
            .quantize_layer(&LayerToQuantize {
                name: "t",
                weight: &w,
                out_features: n,
                in_features: k,
                hessian: None,
            })
            .unwrap()
    }

    #[test]
    fn worked_example_shapes_and_symmetric_zeros() {
        let q = layer(8, 32, 4, GroupSize::Columns(32), true);
        let t = GptqTensors::from_quantized(&q, ZeroConvention::V1).unwrap();
        assert_eq!(t.qweight.len(), 4 * 8);
        assert_eq!(t.qzeros, vec![0x77777777]);
        assert_eq!(
            GptqTensors::from_quantized(&q, ZeroConvention::V2)
                .unwrap()
                .qzeros,
            vec![0x88888888]
        );
        assert!(t.g_idx.iter().all(|&g| g == 0));
        let q3 = layer(32, 32, 3, GroupSize::Columns(32), true);
        let t3 = GptqTensors::from_quantized(&q3, ZeroConvention::V1).unwrap();
        assert_eq!(t3.qzeros, vec![0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]);
    }

    #[test]
    fn round_trip_every_width_group_and_odd_shape() {
        for bits in [2u8, 3, 4, 8] {
            for g in [
                GroupSize::Columns(32),
                GroupSize::Columns(64),
                GroupSize::Columns(128),
                GroupSize::PerChannel,
            ] {
                for (n, k) in [(8, 32), (24, 576), (7, 70), (33, 130), (1, 5)] {
                    for sym in [false, true] {
                        for zc in [ZeroConvention::V1, ZeroConvention::V2] {
                            let q = layer(n, k, bits, g, sym);
                            let back = GptqTensors::from_quantized(&q, zc)
                                .unwrap()
                                .to_quantized(n, k, q.grid, zc)
                                .unwrap();
                            assert_eq!(back, q, "bits {bits} {g:?} {n}x{k} sym {sym} {zc:?}");
                            let (a, b) = (q.dequantize(), back.dequantize());
                            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                        }
                    }
                }
            }
        }
    }

    /// gptqmodel's v1 → v2 conversion, as gptqmodel/utils/model.py does it at 2, 4 and 8
    /// bits: one integer add of 1 in every field to each packed int32 word (wrapping, as
    /// torch's int32 does).
    fn gptqmodel_v1_to_v2(words: &[u32], bits: u8) -> Vec<u32> {
        let ones = (0..32 / bits as u32).fold(0u32, |acc, f| acc | (1 << (f * bits as u32)));
        words.iter().map(|w| w.wrapping_add(ones)).collect()
    }

    /// All-positive rows fit zero point 1, never 0: every v1 field is at most 2^b − 2, so
    /// gptqmodel's packed +1 reads back every true zero point without a carry.
    #[test]
    fn v1_zero_points_survive_gptqmodel_s_packed_add() {
        for bits in [2u8, 4, 8] {
            let (n, k) = (16, 64);
            let w: Vec<f32> = (0..n * k).map(|i| 0.01 + (i % 13) as f32 * 0.003).collect();
            let grid = UniformGrid::new(bits, GroupSize::Columns(32), false).unwrap();
            let q = Rtn { grid }
                .quantize_layer(&LayerToQuantize {
                    name: "t",
                    weight: &w,
                    out_features: n,
                    in_features: k,
                    hessian: None,
                })
                .unwrap();
            assert!(q.zeros.iter().all(|&z| z == 1), "w{bits}");
            let t = GptqTensors::from_quantized(&q, ZeroConvention::V1).unwrap();
            let v2 = GptqTensors {
                qzeros: gptqmodel_v1_to_v2(&t.qzeros, bits),
                ..t
            };
            let back = v2.to_quantized(n, k, grid, ZeroConvention::V2).unwrap();
            assert_eq!(back, q, "w{bits}");
        }
    }

    /// A layer with zero point 0 (as another tool may write it) is stored in v1 as zero 1
    /// with its codes one higher: the same weights, and gptqmodel's packed add reads it
    /// right. A group already on the top code has no such form and is refused.
    #[test]
    fn v1_moves_a_zero_point_of_zero_exactly_or_refuses() {
        let (n, k) = (8, 64);
        let mut q = layer(n, k, 4, GroupSize::Columns(32), false);
        for (i, z) in q.zeros.iter_mut().enumerate() {
            if i % 3 == 0 {
                *z = 0;
            }
        }
        // keep the top code out of the groups with zero 0
        for r in 0..n {
            for j in 0..k {
                if q.zeros[(j / 32) * n + r] == 0 {
                    q.codes[r * k + j] = q.codes[r * k + j].min(14);
                }
            }
        }
        let want = q.dequantize();
        let t = GptqTensors::from_quantized(&q, ZeroConvention::V1).unwrap();
        let back = t.to_quantized(n, k, q.grid, ZeroConvention::V1).unwrap();
        assert!(back.zeros.iter().all(|&z| z >= 1));
        let got = back.dequantize();
        assert!(want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let v2 = GptqTensors {
            qzeros: gptqmodel_v1_to_v2(&t.qzeros, 4),
            ..t
        };
        assert_eq!(
            v2.to_quantized(n, k, q.grid, ZeroConvention::V2).unwrap(),
            back
        );

        q.codes[5] = 15; // row 0, group 0, whose zero point is 0
        let e = GptqTensors::from_quantized(&q, ZeroConvention::V1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("group 0, row 0") && e.contains("gptq_v2"), "{e}");
        // v2 stores zero 0 as it is
        let v2 = GptqTensors::from_quantized(&q, ZeroConvention::V2).unwrap();
        assert_eq!(
            v2.to_quantized(n, k, q.grid, ZeroConvention::V2).unwrap(),
            q
        );
    }

    #[test]
    fn corrupt_g_idx_is_an_error() {
        let q = layer(8, 64, 4, GroupSize::Columns(32), false);
        let mut t = GptqTensors::from_quantized(&q, ZeroConvention::V1).unwrap();
        t.g_idx[3] = 9;
        let e = t
            .to_quantized(8, 64, q.grid, ZeroConvention::V1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("g_idx value 9"), "{e}");
    }
}
