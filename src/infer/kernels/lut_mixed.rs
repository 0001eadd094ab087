//! BAQ's widths on power codebooks, packed: one lookup-table linear ([`LutLinear`]) per
//! width over that width's columns, their outputs summed. Each width's run is exactly a
//! codebook layer of `K_b` columns (its range groups are the run's groups of consecutive
//! stored columns), so the per-width product is the lookup kernel's; the input columns of a
//! width are gathered first (`K_b` floats per token). Decode batches run every width's row
//! kernel inside one pass over the output rows; larger batches run each width's tiled GEMM.

use super::gemv::for_row_chunks;
use super::LutLinear;
use crate::model::{host_matmul_tensor, HostMatmul, PackedMatmul};
use crate::util::SharedOut;
use crate::quant::{CodebookQuantizedLinear, GroupSize, MixedCodebookQuantizedLinear};
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

/// The input columns of one width and the lookup-table linear over them.
#[derive(Debug)]
struct WidthPart {
    columns: Vec<u32>,
    kernel: LutLinear,
}

/// A mixed-codebook layer run as one lookup-table kernel per width.
#[derive(Debug)]
pub struct MixedLutLinear {
    out_features: usize,
    in_features: usize,
    parts: Vec<WidthPart>,
}

impl MixedLutLinear {
    pub fn from_mixed_codebook(q: &MixedCodebookQuantizedLinear) -> Result<Self> {
        let (n, k) = (q.out_features, q.in_features);
        let groups = q.groups();
        let mut parts = Vec::new();
        for (b, run) in groups.runs() {
            let cols = groups.run_columns(&run);
            let kb = cols.len();
            let table = q
                .table_of(b)
                .ok_or_else(|| anyhow::anyhow!("no {b}-bit codebook"))?;
            let mut codes = vec![0u8; n * kb];
            for r in 0..n {
                for (t, &j) in cols.iter().enumerate() {
                    codes[r * kb + t] = q.codes[r * k + j];
                }
            }
            let group_size = match q.group_size {
                Some(size) => GroupSize::Columns(size),
                None => GroupSize::PerChannel,
            };
            let part = CodebookQuantizedLinear {
                out_features: n,
                in_features: kb,
                bits: b,
                group_size,
                exponent: table.exponent,
                table: table.table.clone(),
                codes,
                scales: q.scales[run.start * n..run.end * n].to_vec(),
                g_idx: (0..kb)
                    .map(|t| (t / group_size.columns(kb)) as u32)
                    .collect(),
            };
            parts.push(WidthPart {
                columns: cols.iter().map(|&j| j as u32).collect(),
                kernel: LutLinear::from_codebook(&part)?,
            });
        }
        Ok(Self {
            out_features: n,
            in_features: k,
            parts,
        })
    }
}

impl MixedLutLinear {
    /// Each width's input columns of `x` (`[rows, in]`), `[rows, K_b]`.
    fn gather(&self, p: &WidthPart, x: &[f32], rows: usize) -> Vec<f32> {
        let (k, kb) = (self.in_features, p.columns.len());
        let mut xb = vec![0f32; rows * kb];
        for r in 0..rows {
            for (t, &j) in p.columns.iter().enumerate() {
                xb[r * kb + t] = x[r * k + j as usize];
            }
        }
        xb
    }

    /// Batches of 1–8: one pass over the output rows for all widths (a chunk of rows runs
    /// every width's lookup kernel in turn, summing into `y`), so a layer costs one
    /// dispatch over the cores instead of one per width.
    fn gemv<const M: usize>(&self, x: &[f32], y: &mut [f32]) {
        let n = self.out_features;
        let gathered: Vec<Vec<f32>> = self.parts.iter().map(|p| self.gather(p, x, M)).collect();
        let prepared: Vec<std::borrow::Cow<[f32]>> = self
            .parts
            .iter()
            .zip(&gathered)
            .map(|(p, xb)| p.kernel.prepare_x(xb))
            .collect();
        let row_words: usize = self.parts.iter().map(|p| p.kernel.row_words).sum();
        let out = SharedOut::new(y);
        for_row_chunks(n, row_words, &|r0, r1| {
            for (i, (p, xs)) in self.parts.iter().zip(&prepared).enumerate() {
                p.kernel.rows_range::<M>(xs, r0, r1, &|o: usize, v: [f32; M]| {
                    for (m, &val) in v.iter().enumerate() {
                        // SAFETY: row `o` belongs to this chunk only, and the widths run
                        // one after another on this thread; `y` is `[M, n]`.
                        unsafe {
                            let d = out.at(m * n + o);
                            *d = if i == 0 { val } else { *d + val };
                        }
                    }
                });
            }
        });
    }
}

impl HostMatmul for MixedLutLinear {
    fn matmul_host(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        assert_eq!(x.len(), rows * self.in_features, "x is not [{rows}, in]");
        assert_eq!(y.len(), rows * self.out_features, "y is not [{rows}, out]");
        if !self.parts.is_empty() {
            match rows {
                1 => return self.gemv::<1>(x, y),
                2 => return self.gemv::<2>(x, y),
                3 => return self.gemv::<3>(x, y),
                4 => return self.gemv::<4>(x, y),
                5 => return self.gemv::<5>(x, y),
                6 => return self.gemv::<6>(x, y),
                7 => return self.gemv::<7>(x, y),
                8 => return self.gemv::<8>(x, y),
                _ => {}
            }
        }
        // larger batches: each width's tiled GEMM in turn
        y.iter_mut().for_each(|v| *v = 0.0);
        let n = self.out_features;
        let mut part_y = vec![0f32; rows * n];
        for p in &self.parts {
            let xb = self.gather(p, x, rows);
            p.kernel.matmul_host(&xb, rows, &mut part_y);
            y.iter_mut().zip(&part_y).for_each(|(a, b)| *a += b);
        }
    }
}

impl PackedMatmul for MixedLutLinear {
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (_, k) = x.dims2()?;
        ensure!(
            k == self.in_features,
            "input has {k} features, the layer takes {}",
            self.in_features
        );
        if matches!(x.device(), Device::Cpu) {
            return host_matmul_tensor(self, x, self.out_features);
        }
        // other devices: gather each width's columns and run its kernel there
        let mut y: Option<Tensor> = None;
        for p in &self.parts {
            let idx = Tensor::from_slice(&p.columns, p.columns.len(), x.device())?;
            let part = p.kernel.matmul(&x.index_select(&idx, 1)?)?;
            y = Some(match y {
                None => part,
                Some(acc) => (acc + part)?,
            });
        }
        match y {
            Some(y) => Ok(y),
            // every column pruned
            None => Ok(Tensor::zeros(
                (x.dim(0)?, self.out_features),
                x.dtype(),
                x.device(),
            )?),
        }
    }
    fn resident_bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| 4 * p.columns.len() + p.kernel.resident_bytes())
            .sum()
    }
    fn describe(&self) -> String {
        let widths: Vec<String> = self
            .parts
            .iter()
            .map(|p| format!("{}×{}", p.kernel.describe(), p.columns.len()))
            .collect();
        format!("bitsmith mixed lut [{}]", widths.join(", "))
    }
    fn host(&self) -> Option<&dyn HostMatmul> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::baq::codebook::rtn_mixed_power;
    use crate::quant::grid::{PowerLevels, RangeFit};
    use crate::quant::LayerToQuantize;

    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_dequantize_then_matmul_in_f64() {
        let (n, k) = (70, 200);
        let w: Vec<f32> = noise(n * k, 1).iter().map(|v| 0.2 * v * v * v).collect();
        for (pattern, group) in [
            (vec![0u8, 2, 3, 4, 5, 8], Some(16)),
            (vec![4u8], None),
            (vec![2u8, 6, 7], Some(32)),
            (vec![0u8], None),
        ] {
            let widths: Vec<u8> = (0..k).map(|j| pattern[(j * 7 + 1) % pattern.len()]).collect();
            let layer = LayerToQuantize {
                name: "t",
                weight: &w,
                out_features: n,
                in_features: k,
                hessian: None,
            };
            let q = rtn_mixed_power(&layer, &widths, group, PowerLevels::Extended, RangeFit::MinMax)
                .unwrap();
            let deq = q.dequantize();
            let kernel = MixedLutLinear::from_mixed_codebook(&q).unwrap();
            // GEMV batches and the tiled GEMM
            for rows in [1usize, 3, 8, 20] {
                let x = noise(rows * k, rows as u64 + 7);
                let mut y = vec![f32::NAN; rows * n];
                kernel.matmul_host(&x, rows, &mut y);
                for r in 0..rows {
                    for o in 0..n {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for j in 0..k {
                            let t = x[r * k + j] as f64 * deq[o * k + j] as f64;
                            want += t;
                            mag += t.abs();
                        }
                        let got = y[r * n + o] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag + 1e-12,
                            "{pattern:?} rows {rows} ({r}, {o}): {got} vs {want}"
                        );
                    }
                }
            }
            let x = Tensor::from_vec(noise(5 * k, 3), (5, k), &Device::Cpu).unwrap();
            assert_eq!(kernel.matmul(&x).unwrap().dims(), &[5, n]);
        }
    }
}
