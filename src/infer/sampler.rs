//! Next-token sampling with the usual options, in the order transformers applies them:
//! repetition penalty → temperature → top-k → top-p → draw.

use crate::util::SplitMix64;
use anyhow::{bail, ensure, Result};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy, no randomness).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`
    /// (`None` or 1: all).
    pub top_p: Option<f32>,
    /// CTRL-style penalty on every token already in the context (prompt and generated):
    /// positive logits are divided by it, negative ones multiplied. 1 = off.
    pub repetition_penalty: f32,
    /// Seed of the random draws: the same seed, model and prompt give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Reject values that have no meaning, naming the option.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be ≥ 0 (0 = greedy), got {}",
            self.temperature
        );
        ensure!(
            self.top_k != Some(0),
            "top-k must be at least 1 (leave it unset for no limit)"
        );
        if let Some(p) = self.top_p {
            ensure!(p > 0.0 && p <= 1.0, "top-p must be in (0, 1], got {p}");
        }
        ensure!(
            self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0,
            "repetition penalty must be > 0 (1 = off), got {}",
            self.repetition_penalty
        );
        Ok(())
    }
}

/// A seeded sampler; one per generated sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = SplitMix64::new(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token from one position's `logits`, given the tokens of the `context`
    /// so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32> {
        let dist = self.distribution(logits, context)?;
        if dist.len() == 1 {
            return Ok(dist[0].0);
        }
        // 53 random bits: a uniform double in [0, 1)
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut acc = 0f64;
        for &(id, p) in &dist {
            acc += p as f64;
            if u < acc {
                return Ok(id);
            }
        }
        // rounding left the total a hair under 1: the last candidate
        Ok(dist[dist.len() - 1].0)
    }

    /// The tokens that can be drawn and their probabilities (summing to 1), most likely
    /// first — except that tokens below `NEGLIGIBLE` of the probability mass, which only
    /// a pure temperature draw (no top-k, no top-p) keeps, follow the sorted ones in
    /// vocabulary order. Greedy: the single most likely token (the first one on ties).
    pub fn distribution(&self, logits: &[f32], context: &[u32]) -> Result<Vec<(u32, f32)>> {
        ensure!(!logits.is_empty(), "sampling from empty logits");
        // −∞ only rules a token out; NaN or +∞ means the forward broke (corrupt weights, an
        // overflow in this dtype), and a token drawn from them would be garbage
        if let Some(i) = logits
            .iter()
            .position(|l| l.is_nan() || *l == f32::INFINITY)
        {
            bail!(
                "the model's logits are not finite (token {i}: {}); its weights may be corrupt, \
                 or the computation overflowed in this dtype",
                logits[i]
            );
        }
        let p = &self.params;
        let mut logits = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(&mut logits, context, p.repetition_penalty);
        }
        if p.temperature == 0.0 {
            let best = argmax(&logits);
            return Ok(vec![(best as u32, 1.0)]);
        }
        let inv_t = 1.0 / p.temperature as f64;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
        // every token's unnormalized weight, once
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) * inv_t).exp())
            .collect();
        let weight = |i: u32| w[i as usize];
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let all = || (0..logits.len() as u32).collect::<Vec<u32>>();
        // Sorting the whole vocabulary per token costs milliseconds; only the tokens that
        // carry non-negligible mass need an order, the rest are found in one pass.
        // `total`: the mass top-p is measured against (after top-k, within the k kept)
        let (order, tail, total) = match p.top_k.filter(|&k| k > 0 && k < logits.len()) {
            Some(k) => {
                let mut order = all();
                order.select_nth_unstable_by(k - 1, by_logit);
                order.truncate(k);
                order.sort_by(by_logit);
                let total = order.iter().map(|&i| weight(i)).sum();
                (order, Vec::new(), total)
            }
            None => {
                let total: f64 = w.iter().sum();
                let (mut heavy, light): (Vec<u32>, Vec<u32>) = all()
                    .into_iter()
                    .partition(|&i| weight(i) >= NEGLIGIBLE * total);
                heavy.sort_by(by_logit);
                let heavy_mass: f64 = heavy.iter().map(|&i| weight(i)).sum::<f64>() / total;
                match p.top_p.filter(|&x| x < 1.0) {
                    // the nucleus lies inside the sorted part: the light tokens are all
                    // less likely than every heavy one
                    Some(top_p) if heavy_mass >= top_p as f64 => (heavy, Vec::new(), total),
                    Some(_) => {
                        let mut order = all();
                        order.sort_by(by_logit);
                        (order, Vec::new(), total)
                    }
                    None => (heavy, light, total),
                }
            }
        };
        let weights: Vec<f64> = order.iter().map(|&i| weight(i)).collect();
        let mut keep = order.len();
        if let Some(top_p) = p.top_p.filter(|&x| x < 1.0) {
            let mut mass = 0f64;
            for (n, w) in weights.iter().enumerate() {
                mass += w / total;
                if mass >= top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
        }
        let kept: f64 =
            weights[..keep].iter().sum::<f64>() + tail.iter().map(|&i| weight(i)).sum::<f64>();
        Ok(order[..keep]
            .iter()
            .zip(&weights)
            .map(|(&id, w)| (id, (w / kept) as f32))
            .chain(tail.iter().map(|&i| (i, (weight(i) / kept) as f32)))
            .collect())
    }
}

/// Share of the probability mass under which a token is not sorted into the candidates
/// (sampling still draws it with its exact probability when neither top-k nor top-p
/// excludes it).
pub const NEGLIGIBLE: f64 = 1e-9;

/// Divide positive and multiply negative logits of every token in `context` by `penalty`,
/// once per distinct token (transformers' `RepetitionPenaltyLogitsProcessor`).
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &t in context {
        let i = t as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = logits[i];
            logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
        }
    }
}

/// Index of the largest value (the first one on ties; NaN never wins).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    fn softmax(v: &[f32], t: f64) -> Vec<f64> {
        let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = v.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    const LOGITS: [f32; 6] = [1.0, 3.0, -2.0, 2.5, 0.0, 3.0];

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&LOGITS, &[]).unwrap(), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn nan_or_infinite_logits_are_an_error_but_minus_infinity_rules_a_token_out() {
        for params in [SamplingParams::greedy(), SamplingParams::default()] {
            let mut s = sampler(params);
            for bad in [f32::NAN, f32::INFINITY] {
                let mut l = LOGITS;
                l[4] = bad;
                let e = s.sample(&l, &[]).unwrap_err().to_string();
                assert!(e.contains("not finite") && e.contains("token 4"), "{e}");
            }
            let mut l = LOGITS;
            l[1] = f32::NEG_INFINITY;
            l[5] = f32::NEG_INFINITY;
            assert_ne!(s.sample(&l, &[]).unwrap(), 1);
        }
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_with_renormalized_softmax() {
        let s = sampler(SamplingParams {
            temperature: 2.0,
            top_k: Some(3),
            ..SamplingParams::default()
        });
        let d = s.distribution(&LOGITS, &[]).unwrap();
        let mut ids: Vec<u32> = d.iter().map(|x| x.0).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 3, 5]);
        let want = softmax(&[3.0, 2.5, 3.0], 2.0);
        for (id, p) in d {
            let w = match id {
                1 | 5 => want[0],
                _ => want[1],
            };
            assert!((p as f64 - w).abs() < 1e-6, "{id}: {p} vs {w}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        let probs = softmax(&LOGITS, 1.0);
        let mut sorted: Vec<(usize, f64)> = probs.iter().cloned().enumerate().collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
        for p in [0.05f32, 0.3, 0.5, 0.8, 0.95, 0.999] {
            let s = sampler(SamplingParams {
                temperature: 1.0,
                top_p: Some(p),
                ..SamplingParams::default()
            });
            let d = s.distribution(&LOGITS, &[]).unwrap();
            let n = d.len();
            let mass = |k: usize| sorted[..k].iter().map(|x| x.1).sum::<f64>();
            assert!(mass(n) >= p as f64, "p {p}: kept {n} with mass {}", mass(n));
            assert!(
                n == 1 || mass(n - 1) < p as f64,
                "p {p}: {n} is not the smallest"
            );
            let total: f32 = d.iter().map(|x| x.1).sum();
            assert!((total - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn partial_sorting_gives_the_full_sort_distribution() {
        // a vocabulary-sized spread of logits: a few likely tokens and a long tail
        let mut x = 0x1234_5678_9abc_def1u64;
        let logits: Vec<f32> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 40) as f32 / (1u64 << 24) as f32;
                (u * u * u * u) * 30.0 - 5.0
            })
            .collect();
        for (temperature, top_p) in [(0.7, None), (1.0, Some(0.9)), (0.3, Some(0.999_999))] {
            let d = sampler(SamplingParams {
                temperature,
                top_p,
                ..SamplingParams::default()
            })
            .distribution(&logits, &[])
            .unwrap();
            // reference: sort everything, softmax at the temperature, cut at top-p
            let probs = softmax(&logits, temperature as f64);
            let mut sorted: Vec<(usize, f64)> = probs.iter().cloned().enumerate().collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
            let keep = match top_p {
                None => sorted.len(),
                Some(p) => {
                    let mut mass = 0.0;
                    sorted
                        .iter()
                        .position(|x| {
                            mass += x.1;
                            mass >= p as f64
                        })
                        .unwrap()
                        + 1
                }
            };
            assert_eq!(d.len(), keep, "T={temperature} top_p={top_p:?}");
            let kept: f64 = sorted[..keep].iter().map(|x| x.1).sum();
            let mut got: Vec<(u32, f32)> = d.clone();
            got.sort_by_key(|x| x.0);
            let mut want: Vec<(usize, f64)> = sorted[..keep].to_vec();
            want.sort_by_key(|x| x.0);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.0 as usize, w.0);
                assert!((g.1 as f64 - w.1 / kept).abs() <= 1e-6 * (w.1 / kept) + 1e-12);
            }
            // the sorted head really is sorted, most likely first
            let heavy: Vec<f32> = d
                .iter()
                .take_while(|x| x.1 as f64 >= 1e-9)
                .map(|x| x.1)
                .collect();
            assert!(heavy.windows(2).all(|p| p[0] >= p[1]));
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 1.0, 0.5];
        apply_repetition_penalty(&mut l, &[0, 1, 1, 0, 3], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 0.25]);
        // with the penalty the greedy choice moves off a repeated token
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[2.0, 1.5, 0.0], &[0]).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_the_distribution() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..SamplingParams::default()
        };
        let draw = |params: &SamplingParams, n: usize| -> Vec<u32> {
            let mut s = sampler(params.clone());
            (0..n).map(|_| s.sample(&LOGITS, &[]).unwrap()).collect()
        };
        assert_eq!(draw(&params, 50), draw(&params, 50));
        let other = SamplingParams {
            seed: 43,
            ..params.clone()
        };
        assert_ne!(draw(&params, 50), draw(&other, 50));
        let n = 20000;
        let tokens = draw(&params, n);
        let want = softmax(&LOGITS, 1.0);
        for (id, w) in want.iter().enumerate() {
            let f = tokens.iter().filter(|&&t| t as usize == id).count() as f64 / n as f64;
            // binomial standard deviation ≤ 0.0036 at n = 20000: 5σ
            assert!((f - w).abs() < 0.018, "token {id}: frequency {f} vs p {w}");
        }
    }

    #[test]
    fn invalid_parameters_are_named() {
        for (params, word) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..SamplingParams::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: Some(0.0),
                    ..SamplingParams::default()
                },
                "top-p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..SamplingParams::default()
                },
                "repetition penalty",
            ),
        ] {
            let e = Sampler::new(params).unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }
}
