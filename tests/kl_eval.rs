//! KL divergence, top-1 agreement and Δp of `bitsmith::eval::kl_divergence` on a small
//! synthetic model and a perturbed copy, against a float64 reference computed here from
//! the same logits; a model against itself; saved top-k base logits against the direct
//! computation within the bound stated in `eval::divergence::compare_top_k`; and the
//! checks that refuse a logits file made from other windows.

mod common;

use bitsmith::eval::{
    kl_divergence, perplexity, perplexity_saving, KlBase, KlOptions, KlResult, LogitsHeader,
    LogitsReader, LogitsWriter, PplOptions,
};
use bitsmith::loader::resolve_model;
use bitsmith::model::CausalLm;
use candle_core::{DType, Device};
use common::{logits, Lcg, Synth};

const SEQLEN: usize = 24;
const WINDOWS: usize = 5;

fn load(dir: &std::path::Path) -> CausalLm {
    let files = resolve_model(dir.to_str().unwrap(), None).unwrap();
    bitsmith::load_model(&files, DType::F32, &Device::Cpu).unwrap()
}

/// A synthetic base and a copy with every MLP down projection perturbed by `noise`.
fn models(noise: f32) -> (Synth, CausalLm, CausalLm) {
    let s = Synth::default();
    let dir = tempfile::tempdir().unwrap();
    let w = s.write(dir.path(), 11, false);
    let base = load(dir.path());
    let mut model = load(dir.path());
    let mut r = Lcg::new(5);
    for l in 0..s.layers {
        let name = format!("model.layers.{l}.mlp.down_proj");
        let t = &w[&format!("{name}.weight")];
        let v = t.data.iter().map(|x| x + noise * r.next()).collect();
        model.set_linear_weights(&name, v).unwrap();
    }
    (s, base, model)
}

fn ids(s: &Synth) -> Vec<u32> {
    let mut r = Lcg::new(3);
    // a little over WINDOWS windows: the partial tail must be dropped
    (0..SEQLEN * WINDOWS + 7)
        .map(|_| ((r.next() + 1.0) * 0.5 * s.vocab as f32) as u32 % s.vocab as u32)
        .collect()
}

fn opts() -> KlOptions {
    KlOptions {
        seqlen: SEQLEN,
        batch: 2,
        limit: None,
        progress: false,
    }
}

/// Float64 reference of one token: (KL, agree, Δp, nll_base, nll_model, logit range).
fn reference(z: &[f32], y: &[f32], t: usize) -> (f64, bool, f64, f64, f64, f64) {
    let ls = |r: &[f32]| {
        let m = r
            .iter()
            .map(|&x| x as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = r.iter().map(|&x| (x as f64 - m).exp()).sum();
        r.iter().map(|&x| x as f64 - m - s.ln()).collect::<Vec<_>>()
    };
    let (lp, lq) = (ls(z), ls(y));
    let kl = lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum();
    let argmax = |v: &[f64]| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best });
    let d: Vec<f64> = z
        .iter()
        .zip(y)
        .map(|(a, b)| *a as f64 - *b as f64)
        .collect();
    let range = d.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        - d.iter().cloned().fold(f64::INFINITY, f64::min);
    (
        kl,
        argmax(&lp) == argmax(&lq),
        lq[t].exp() - lp[t].exp(),
        -lp[t],
        -lq[t],
        range,
    )
}

struct Reference {
    mean_kl: f64,
    max_kl: f64,
    agreement: f64,
    rms_dp: f64,
    ppl: f64,
    ppl_base: f64,
    max_range: f64,
}

fn reference_run(s: &Synth, base: &CausalLm, model: &CausalLm, ids: &[u32]) -> Reference {
    let (mut kl, mut max_kl, mut agree, mut dp2, mut nll, mut nll_b, mut range) =
        (0.0, 0f64, 0.0, 0.0, 0.0, 0.0, 0f64);
    let mut n = 0.0;
    for w in 0..WINDOWS {
        let win = &ids[w * SEQLEN..(w + 1) * SEQLEN];
        let (zb, ym) = (logits(base, win), logits(model, win));
        for p in 0..SEQLEN - 1 {
            let t = win[p + 1] as usize;
            assert!(t < s.vocab);
            let (k, a, d, nb, nm, r) = reference(&zb[p], &ym[p], t);
            kl += k;
            max_kl = max_kl.max(k);
            agree += a as u8 as f64;
            dp2 += d * d;
            nll += nm;
            nll_b += nb;
            range = range.max(r);
            n += 1.0;
        }
    }
    Reference {
        mean_kl: kl / n,
        max_kl,
        agreement: agree / n,
        rms_dp: (dp2 / n).sqrt(),
        ppl: (nll / n).exp(),
        ppl_base: (nll_b / n).exp(),
        max_range: range,
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-12)
}

#[test]
fn kl_agreement_and_delta_p_match_float64_reference() {
    let (s, base, model) = models(0.05);
    let ids = ids(&s);
    let r = &kl_divergence(KlBase::Model(&base), &[&model], &ids, &opts()).unwrap()[0];
    let f = reference_run(&s, &base, &model, &ids);
    assert_eq!(r.windows, WINDOWS);
    assert_eq!(r.predicted_tokens, WINDOWS * (SEQLEN - 1));
    // same f32 logits, f64 arithmetic on both sides: only summation order differs
    let k = &r.kl_divergence;
    assert!(
        f.mean_kl > 1e-4,
        "the perturbation must move the model: {}",
        f.mean_kl
    );
    assert!(
        close(k.mean, f.mean_kl, 1e-9),
        "{} vs {}",
        k.mean,
        f.mean_kl
    );
    assert!(close(k.max, f.max_kl, 1e-9), "{} vs {}", k.max, f.max_kl);
    assert!(k.median <= k.p99 && k.p99 <= k.max && k.median > 0.0);
    assert!((r.top1_agreement - f.agreement).abs() < 1e-12);
    assert!(f.agreement < 1.0, "some top-1 tokens must change");
    assert!(
        close(r.rms_delta_p, f.rms_dp, 1e-9),
        "{} vs {}",
        r.rms_delta_p,
        f.rms_dp
    );
    assert!(close(r.ppl, f.ppl, 1e-9) && close(r.ppl_base, f.ppl_base, 1e-9));
    assert!(k.mean_se.unwrap() > 0.0 && r.ppl_se.unwrap() > 0.0);
    // the base's own perplexity agrees with plain `ppl`
    let p = perplexity(
        &base,
        &ids,
        &PplOptions {
            seqlen: SEQLEN,
            batch: 3,
            limit: None,
            progress: false,
        },
    )
    .unwrap();
    assert!(
        close(p.ppl, r.ppl_base, 1e-6),
        "{} vs {}",
        p.ppl,
        r.ppl_base
    );
}

#[test]
fn a_model_against_itself() {
    let (s, base, _) = models(0.0);
    let ids = ids(&s);
    let r = &kl_divergence(KlBase::Model(&base), &[&base], &ids, &opts()).unwrap()[0];
    assert_eq!(r.kl_divergence.max, 0.0);
    assert_eq!(r.kl_divergence.mean, 0.0);
    assert_eq!(r.top1_agreement, 1.0);
    assert_eq!(r.rms_delta_p, 0.0);
    assert_eq!(r.ppl, r.ppl_base);
    assert_eq!(r.delta_nll, 0.0);
}

fn save(base: &CausalLm, ids: &[u32], top_k: usize, path: &std::path::Path) -> f64 {
    let windows = bitsmith::eval::windows::Windows::new(ids, SEQLEN, None).unwrap();
    let header = LogitsHeader {
        model: "synthetic".into(),
        corpus: "random ids".into(),
        vocab: base.config.vocab_size,
        seqlen: SEQLEN,
        windows: windows.count(),
        top_k,
    };
    let mut w = LogitsWriter::create(path, header, windows.tokens()).unwrap();
    let p = perplexity_saving(
        base,
        ids,
        &PplOptions {
            seqlen: SEQLEN,
            batch: 2,
            limit: None,
            progress: false,
        },
        Some(&mut w),
    )
    .unwrap();
    w.finish().unwrap();
    p.ppl
}

fn from_file(path: &std::path::Path, model: &CausalLm, ids: &[u32]) -> KlResult {
    let mut reader = LogitsReader::open(path).unwrap();
    kl_divergence(KlBase::File(&mut reader), &[model], ids, &opts())
        .unwrap()
        .remove(0)
}

#[test]
fn saved_top_k_reproduces_the_direct_computation_within_the_bound() {
    let (s, base, model) = models(0.05);
    let ids = ids(&s);
    let direct = &kl_divergence(KlBase::Model(&base), &[&model], &ids, &opts()).unwrap()[0];
    let f = reference_run(&s, &base, &model, &ids);
    let dir = tempfile::tempdir().unwrap();
    // the whole vocabulary saved: no bucket, the same numbers up to summation order
    let all = dir.path().join("all.logits");
    let saved_ppl = save(&base, &ids, s.vocab, &all);
    let r = from_file(&all, &model, &ids);
    assert!(close(r.kl_divergence.mean, direct.kl_divergence.mean, 1e-9));
    assert_eq!(r.top1_agreement, direct.top1_agreement);
    assert!(close(r.rms_delta_p, direct.rms_delta_p, 1e-12));
    assert!(close(r.ppl_base, saved_ppl, 1e-12));
    assert_eq!(r.base_tail_mass.as_ref().unwrap().max, 0.0);
    for k in [1, 5, 20] {
        let p = dir.path().join(format!("top{k}.logits"));
        save(&base, &ids, k, &p);
        let r = from_file(&p, &model, &ids);
        let tail = r.base_tail_mass.as_ref().unwrap();
        assert!(tail.mean > 0.0);
        // per token 0 ≤ exact − bucketed ≤ T·min(R, R²/8), R the range of the two models'
        // logit differences over the bucket (≤ over the whole vocabulary): averaged,
        // the gap is at most mean(T)·min(R, R²/8) with R's maximum over tokens
        let bound = tail.mean * f.max_range.min(f.max_range * f.max_range / 8.0);
        let gap = direct.kl_divergence.mean - r.kl_divergence.mean;
        assert!(
            gap >= -1e-12 && gap <= bound + 1e-12,
            "top-{k}: gap {gap:e}, bound {bound:e}"
        );
        // the top-1 token and the correct token's probability are exact from a file
        assert_eq!(r.top1_agreement, direct.top1_agreement);
        assert!(close(r.rms_delta_p, direct.rms_delta_p, 1e-12));
        assert!(close(r.ppl_base, direct.ppl_base, 1e-9));
    }
}

#[test]
fn a_file_from_other_windows_is_refused() {
    let (s, base, model) = models(0.05);
    let ids = ids(&s);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.logits");
    save(&base, &ids, 4, &p);
    let err = |ids: &[u32], seqlen: usize, limit: Option<usize>| {
        let mut reader = LogitsReader::open(&p).unwrap();
        let o = KlOptions {
            seqlen,
            limit,
            ..opts()
        };
        format!(
            "{:#}",
            kl_divergence(KlBase::File(&mut reader), &[&model], ids, &o).unwrap_err()
        )
    };
    let e = err(&ids, SEQLEN / 2, None);
    assert!(
        e.contains("windows of 24 tokens; this run uses --seqlen 12"),
        "{e}"
    );
    let mut other = ids.clone();
    other[SEQLEN + 3] = (other[SEQLEN + 3] + 1) % s.vocab as u32;
    let e = err(&other, SEQLEN, None);
    assert!(e.contains("window 1 position 3"), "{e}");
    let longer: Vec<u32> = ids.iter().chain(&ids).copied().collect();
    let e = err(&longer, SEQLEN, None);
    assert!(e.contains("holds 5 windows; this run evaluates 10"), "{e}");
    // fewer windows than saved is fine
    let mut reader = LogitsReader::open(&p).unwrap();
    let o = KlOptions {
        limit: Some(2),
        ..opts()
    };
    assert_eq!(
        kl_divergence(KlBase::File(&mut reader), &[&model], &ids, &o).unwrap()[0].windows,
        2
    );
    // a truncated file says so
    let bytes = std::fs::read(&p).unwrap();
    let cut = dir.path().join("cut.logits");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let e = format!("{:#}", LogitsReader::open(&cut).err().unwrap());
    assert!(e.contains("truncated"), "{e}");
    let junk = dir.path().join("junk.logits");
    std::fs::write(&junk, b"not logits at all").unwrap();
    let e = format!("{:#}", LogitsReader::open(&junk).err().unwrap());
    assert!(e.contains("is not a bitsmith logits file"), "{e}");
}
