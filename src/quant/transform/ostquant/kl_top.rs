//! OSTQuant's KL-Top loss (methods.md §6.4): per token, the teacher's top-`k` vocabulary
//! entries, `Σ_{i∈top} p_T(i) (log p_T(i) − log p_S(i))` with both softmaxes taken over
//! the full vocabulary (no renormalisation over the top set), averaged over tokens.
//!
//! The loss and its gradient with respect to the student's logits are computed here on
//! host rows, not by autograd: a `[tokens, vocab]` softmax graph would hold several
//! copies of the logits, and the gradient has a closed form. With `P = Σ_{i∈top} p_T(i)`:
//! `∂loss_t/∂z_j = P · p_S(j) − p_T(j) · [j ∈ top]`.

use rayon::prelude::*;

/// The teacher's top-`k` per token: indices and full-vocabulary probabilities.
#[derive(Debug, Clone)]
pub struct TeacherTopK {
    pub k: usize,
    /// `[tokens, k]`.
    pub index: Vec<u32>,
    pub prob: Vec<f32>,
}

impl TeacherTopK {
    /// From the teacher's logits `[tokens, vocab]` (row-major).
    pub fn from_logits(logits: &[f32], vocab: usize, k: usize) -> Self {
        let k = k.min(vocab);
        let tokens = logits.len() / vocab;
        let mut index = vec![0u32; tokens * k];
        let mut prob = vec![0f32; tokens * k];
        index
            .par_chunks_mut(k)
            .zip(prob.par_chunks_mut(k))
            .zip(logits.par_chunks(vocab))
            .for_each(|((idx, p), z)| {
                let lse = log_sum_exp(z);
                let mut order: Vec<u32> = (0..vocab as u32).collect();
                if k < vocab {
                    // the k largest first (their order among themselves does not matter)
                    order.select_nth_unstable_by(k - 1, |&a, &b| {
                        z[b as usize].total_cmp(&z[a as usize])
                    });
                }
                for (j, &i) in order[..k].iter().enumerate() {
                    idx[j] = i;
                    p[j] = (z[i as usize] as f64 - lse).exp() as f32;
                }
            });
        Self { k, index, prob }
    }

    pub fn tokens(&self) -> usize {
        self.index.len() / self.k.max(1)
    }
}

/// `log Σ exp(z)` in f64.
fn log_sum_exp(z: &[f32]) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let s: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + s.ln()
}

/// The summed KL-Top loss of the student's logits `z` (`[tokens, vocab]`) against
/// `teacher`; `z` is overwritten with `scale · ∂loss/∂z` (pass `1 / total tokens` for the
/// gradient of the mean).
pub fn kl_top_loss_and_grad(z: &mut [f32], vocab: usize, teacher: &TeacherTopK, scale: f32) -> f64 {
    let k = teacher.k;
    z.par_chunks_mut(vocab)
        .zip(teacher.index.par_chunks(k))
        .zip(teacher.prob.par_chunks(k))
        .map(|((z, idx), p_t)| {
            let lse = log_sum_exp(z);
            let mut loss = 0f64;
            let mut mass = 0f64;
            for (&i, &p) in idx.iter().zip(p_t) {
                let log_ps = z[i as usize] as f64 - lse;
                if p > 0.0 {
                    loss += p as f64 * ((p as f64).ln() - log_ps);
                }
                mass += p as f64;
            }
            // z ← scale · (P · p_S − p_T · [top])
            for v in z.iter_mut() {
                *v = (scale as f64 * mass * (*v as f64 - lse).exp()) as f32;
            }
            for (&i, &p) in idx.iter().zip(p_t) {
                z[i as usize] -= scale * p;
            }
            loss
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(tokens: usize, vocab: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::util::SplitMix64::new(seed);
        (0..tokens * vocab)
            .map(|_| (rng.next_u64() % 10_000) as f32 / 1000.0 - 5.0)
            .collect()
    }

    /// The loss in float64 from the definition.
    fn reference_loss(zs: &[f32], zt: &[f32], vocab: usize, k: usize) -> f64 {
        zs.chunks(vocab)
            .zip(zt.chunks(vocab))
            .map(|(s, t)| {
                let lse = |z: &[f32]| {
                    let m = z.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
                    m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
                };
                let (ls, lt) = (lse(s), lse(t));
                let mut order: Vec<usize> = (0..vocab).collect();
                order.sort_by(|&a, &b| t[b].total_cmp(&t[a]));
                order[..k]
                    .iter()
                    .map(|&i| {
                        let lpt = t[i] as f64 - lt;
                        lpt.exp() * (lpt - (s[i] as f64 - ls))
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn loss_and_gradient_match_float64_and_finite_differences() {
        let (tokens, vocab, k) = (3, 40, 7);
        let zt = logits(tokens, vocab, 1);
        let zs = logits(tokens, vocab, 2);
        let top = TeacherTopK::from_logits(&zt, vocab, k);
        let mut g = zs.clone();
        let loss = kl_top_loss_and_grad(&mut g, vocab, &top, 1.0);
        let want = reference_loss(&zs, &zt, vocab, k);
        assert!(
            (loss - want).abs() < 1e-5 * (1.0 + want.abs()),
            "{loss} vs {want}"
        );
        // central differences of the float64 loss
        let h = 1e-3f32;
        for j in [0, 5, 17, 39, 40 + 3, 2 * 40 + 21] {
            let (mut up, mut dn) = (zs.clone(), zs.clone());
            up[j] += h;
            dn[j] -= h;
            let fd = (reference_loss(&up, &zt, vocab, k) - reference_loss(&dn, &zt, vocab, k))
                / (2.0 * h as f64);
            assert!(
                (g[j] as f64 - fd).abs() < 1e-3,
                "∂/∂z[{j}]: {} vs {fd}",
                g[j]
            );
        }
    }

    #[test]
    fn equal_logits_give_zero_loss_only_with_full_mass() {
        let (vocab, k) = (30, 30);
        let z = logits(2, vocab, 3);
        let top = TeacherTopK::from_logits(&z, vocab, k);
        let mut g = z.clone();
        let loss = kl_top_loss_and_grad(&mut g, vocab, &top, 1.0);
        assert!(loss.abs() < 1e-6, "{loss}");
        assert!(g.iter().all(|v| v.abs() < 1e-6));
    }
}
