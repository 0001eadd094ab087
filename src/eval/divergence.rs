//! Per-token comparison of a model's next-token distribution with a base model's: the KL
//! divergence `KL(P_base ‖ P_model)` over the full vocabulary, top-1 agreement and the change
//! in the probability of the correct token. Everything past the f32 logits is f64.
//!
//! A base may be known fully (its logits) or by its top-k tokens as saved by
//! `--save-logits`; then the base's other tokens form one bucket (see [`compare_top_k`]).

use std::cmp::Ordering;

/// One predicted token, base against model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenStats {
    /// `KL(P_base ‖ P_model)` in nats.
    pub kl: f64,
    /// `-ln p_base(correct)`.
    pub nll_base: f64,
    /// `-ln p_model(correct)`.
    pub nll_model: f64,
    /// Both distributions have the same most likely token (ties go to the lowest id).
    pub top1_agree: bool,
    /// `p_model(correct) − p_base(correct)`.
    pub delta_p: f64,
    /// Base probability outside its saved top-k (0 when the base is known fully).
    pub base_tail: f64,
}

/// The largest logit and the lowest id holding it.
pub fn max_argmax(row: &[f32]) -> (f32, u32) {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (i, &x) in row.iter().enumerate() {
        if x > best.0 {
            best = (x, i as u32);
        }
    }
    best
}

/// Compare two full rows of logits for the token predicting `target`.
///
/// With `e_i = exp(z_i − max z)`, `S = Σ e_i` and `lse = max + ln S` (likewise for the
/// model's `y`), `KL = Σ p_i (z_i − y_i) − (lse_z − lse_y)` with `p_i = e_i / S`: one pass
/// and two `exp` per vocabulary entry, exactly 0 for identical rows. Rounding can leave a
/// true 0 at −1e−17; the result is clamped at 0.
pub fn compare_rows(base: &[f32], model: &[f32], target: usize) -> TokenStats {
    debug_assert_eq!(base.len(), model.len());
    let (mz, az) = max_argmax(base);
    let (my, ay) = max_argmax(model);
    let (mz, my) = (mz as f64, my as f64);
    let (mut sz, mut sy, mut weighted) = (0f64, 0f64, 0f64);
    for (&z, &y) in base.iter().zip(model) {
        let (z, y) = (z as f64, y as f64);
        let e = (z - mz).exp();
        sz += e;
        sy += (y - my).exp();
        weighted += e * (z - y);
    }
    let (lse_z, lse_y) = (mz + sz.ln(), my + sy.ln());
    let nll_base = lse_z - base[target] as f64;
    let nll_model = lse_y - model[target] as f64;
    TokenStats {
        kl: (weighted / sz - (lse_z - lse_y)).max(0.0),
        nll_base,
        nll_model,
        top1_agree: az == ay,
        delta_p: (-nll_model).exp() - (-nll_base).exp(),
        base_tail: 0.0,
    }
}

/// What a saved base keeps of one token's distribution.
#[derive(Debug, Clone, Copy)]
pub struct TopKRow<'a> {
    /// `ln Σ_i exp(z_i)` over the full vocabulary.
    pub lse: f64,
    /// `ln` of the base probability outside `ids` (−∞ when `ids` is the whole vocabulary).
    pub log_tail: f64,
    /// `-ln p_base(correct)`, from the full row.
    pub nll: f64,
    /// The k most likely tokens, most likely first (ties: lowest id first).
    pub ids: &'a [u32],
    /// Their raw logits, as the base model produced them.
    pub logits: &'a [f32],
}

/// An owned [`TopKRow`].
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub lse: f64,
    pub log_tail: f64,
    pub nll: f64,
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
}

impl TopK {
    pub fn as_row(&self) -> TopKRow<'_> {
        TopKRow {
            lse: self.lse,
            log_tail: self.log_tail,
            nll: self.nll,
            ids: &self.ids,
            logits: &self.logits,
        }
    }
}

/// Descending logit, then ascending id: the order of a saved top-k (its first entry is the
/// argmax [`max_argmax`] picks).
fn by_logit_desc(row: &[f32], a: u32, b: u32) -> Ordering {
    row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
}

/// The top-`k` summary of a full row of base logits. `scratch` is reused between calls
/// (index buffer and a vocabulary-sized mask).
pub fn top_k(row: &[f32], target: usize, k: usize, scratch: &mut Scratch) -> TopK {
    let v = row.len();
    let k = k.min(v);
    let (m, _) = max_argmax(row);
    let m = m as f64;
    let idx = &mut scratch.index;
    idx.clear();
    idx.extend(0..v as u32);
    if k < v {
        idx.select_nth_unstable_by(k, |&a, &b| by_logit_desc(row, a, b));
    }
    let top = &mut idx[..k];
    top.sort_unstable_by(|&a, &b| by_logit_desc(row, a, b));
    let ids = top.to_vec();
    let mask = scratch.mask(v);
    for &i in &ids {
        mask[i as usize] = true;
    }
    // the tail summed directly, not as 1 − Σ top: that difference cancels to noise (or
    // below 0) when the tail holds 1e−9 of the mass
    let (mut total, mut tail) = (0f64, 0f64);
    for (&x, &in_top) in row.iter().zip(mask.iter()) {
        let e = (x as f64 - m).exp();
        total += e;
        if !in_top {
            tail += e;
        }
    }
    for &i in &ids {
        mask[i as usize] = false;
    }
    let lse = m + total.ln();
    TopK {
        lse,
        log_tail: tail.ln() - total.ln(),
        nll: lse - row[target] as f64,
        logits: ids.iter().map(|&i| row[i as usize]).collect(),
        ids,
    }
}

/// Buffers reused across rows by [`top_k`] and [`compare_top_k`].
#[derive(Debug, Default)]
pub struct Scratch {
    index: Vec<u32>,
    mask: Vec<bool>,
}

impl Scratch {
    /// An all-false mask of `v` entries (callers reset what they set).
    fn mask(&mut self, v: usize) -> &mut [bool] {
        if self.mask.len() < v {
            self.mask.resize(v, false);
        }
        &mut self.mask[..v]
    }
}

/// Compare a saved base (its top-k) with a model's full row.
///
/// The top-k tokens contribute `Σ_{i∈K} p_i ln(p_i / q_i)` exactly. The rest of the
/// vocabulary is one bucket: base mass `T = Σ_{i∉K} p_i` (saved) against model mass
/// `Q = Σ_{i∉K} q_i` (summed here), contributing `T ln(T / Q)`. By the log-sum inequality
/// this is a lower bound: the exact value exceeds it by `T · KL(p_tail/T ‖ q_tail/Q)`, the
/// divergence inside the bucket. When the two models' logits differ by between `a` and
/// `b` on the bucket's tokens, that divergence is at most `min(b − a, (b − a)²/8)`
/// (Hoeffding's lemma on the tilt `ln(p_i/q_i)`), so a bucket that holds little mass costs
/// little: the error is at most `T · (b − a)²/8`.
pub fn compare_top_k(
    base: TopKRow,
    model: &[f32],
    target: usize,
    scratch: &mut Scratch,
) -> TokenStats {
    let v = model.len();
    let (my, ay) = max_argmax(model);
    let my = my as f64;
    let mask = scratch.mask(v);
    for &i in base.ids {
        mask[i as usize] = true;
    }
    let (mut sy, mut tail_y) = (0f64, 0f64);
    for (&y, &in_top) in model.iter().zip(mask.iter()) {
        let f = (y as f64 - my).exp();
        sy += f;
        if !in_top {
            tail_y += f;
        }
    }
    for &i in base.ids {
        mask[i as usize] = false;
    }
    let lse_y = my + sy.ln();
    let mut kl = 0f64;
    for (&i, &z) in base.ids.iter().zip(base.logits) {
        let lp = z as f64 - base.lse;
        let lq = model[i as usize] as f64 - lse_y;
        kl += lp.exp() * (lp - lq);
    }
    let t = base.log_tail.exp();
    if t > 0.0 {
        // a model that gives the bucket no representable mass diverges without bound;
        // the smallest positive f64 keeps the number finite and huge
        let log_q = tail_y.max(f64::MIN_POSITIVE).ln() - sy.ln();
        kl += t * (base.log_tail - log_q);
    }
    let nll_model = lse_y - model[target] as f64;
    TokenStats {
        kl: kl.max(0.0),
        nll_base: base.nll,
        nll_model,
        top1_agree: base.ids.first() == Some(&ay),
        delta_p: (-nll_model).exp() - (-base.nll).exp(),
        base_tail: t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent f64 reference: log-softmax of each row, then Σ p (log p − log q).
    fn reference(z: &[f32], y: &[f32]) -> f64 {
        let ls = |r: &[f32]| {
            let m = r
                .iter()
                .map(|&x| x as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = r.iter().map(|&x| (x as f64 - m).exp()).sum();
            r.iter().map(|&x| x as f64 - m - s.ln()).collect::<Vec<_>>()
        };
        let (lp, lq) = (ls(z), ls(y));
        lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
    }

    fn rows(seed: u64, v: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        };
        let z: Vec<f32> = (0..v).map(|_| next() * 8.0).collect();
        let y = z.iter().map(|&x| x + next() * scale).collect();
        (z, y)
    }

    #[test]
    fn kl_matches_float64_reference() {
        for (seed, scale) in [(1, 0.01), (2, 0.3), (3, 3.0)] {
            let (z, y) = rows(seed, 1000, scale);
            let s = compare_rows(&z, &y, 7);
            let r = reference(&z, &y);
            assert!((s.kl - r).abs() <= 1e-12 * r.max(1e-3), "{} vs {r}", s.kl);
        }
    }

    #[test]
    fn identical_rows_give_zero() {
        let (z, _) = rows(4, 500, 0.0);
        let s = compare_rows(&z, &z, 3);
        assert_eq!(s.kl, 0.0);
        assert!(s.top1_agree);
        assert_eq!(s.delta_p, 0.0);
    }

    #[test]
    fn full_top_k_is_exact_and_partial_is_a_bounded_lower_bound() {
        let mut scratch = Scratch::default();
        let (z, y) = rows(5, 400, 0.5);
        let exact = compare_rows(&z, &y, 11);
        let full = top_k(&z, 11, 400, &mut scratch);
        let f = compare_top_k(full.as_row(), &y, 11, &mut scratch);
        assert!((f.kl - exact.kl).abs() < 1e-12, "{} vs {}", f.kl, exact.kl);
        assert_eq!(f.top1_agree, exact.top1_agree);
        for k in [1, 10, 100] {
            let t = top_k(&z, 11, k, &mut scratch);
            let p = compare_top_k(t.as_row(), &y, 11, &mut scratch);
            // the bound of `compare_top_k`, from the logit differences on the bucket
            let d: Vec<f64> = (0..z.len())
                .filter(|i| !t.ids.contains(&(*i as u32)))
                .map(|i| z[i] as f64 - y[i] as f64)
                .collect();
            let range = d.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
                - d.iter().cloned().fold(f64::INFINITY, f64::min);
            let bound = p.base_tail * range.min(range * range / 8.0);
            let gap = exact.kl - p.kl;
            assert!(
                gap >= -1e-12 && gap <= bound + 1e-12,
                "k {k}: gap {gap}, bound {bound}"
            );
            assert_eq!(p.nll_base, exact.nll_base);
            assert!((p.delta_p - exact.delta_p).abs() < 1e-15);
        }
    }

    #[test]
    fn top_k_order_and_tail() {
        let mut scratch = Scratch::default();
        let row = [0.5f32, 2.0, 2.0, -1.0, 3.0];
        let t = top_k(&row, 0, 3, &mut scratch);
        assert_eq!(t.ids, vec![4, 1, 2]);
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((t.lse - lse).abs() < 1e-15);
        let tail = ((0.5f64).exp() + (-1f64).exp()).ln() - lse;
        assert!((t.log_tail - tail).abs() < 1e-15);
        assert_eq!(max_argmax(&row), (3.0, 4));
    }
}
