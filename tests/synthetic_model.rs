//! Small synthetic models, written as real HF folders: the candle model against a float64
//! reference written here, the block-streamed path against the whole-model forward, and
//! quantize → pack → reload against fake quantization in memory.

mod common;

use bitsmith::loader::resolve_model;
use bitsmith::model::CausalLm;
use bitsmith::pack::ZeroConvention;
use bitsmith::quant::GroupSize;
use candle_core::{DType, Device, Tensor};
use common::{logits, rtn_packed, RtnPacked, Synth, Tensor as T};
use std::collections::BTreeMap;

/// Straightforward float64 Llama forward (HF semantics), independent of candle.
fn reference_logits(s: &Synth, w: &BTreeMap<String, T>, ids: &[u32]) -> Vec<Vec<f64>> {
    let (h, hd, nh, nkv) = (s.hidden, s.head_dim(), s.heads, s.kv_heads);
    let n = ids.len();
    let get = |name: &str| -> Vec<f64> { w[name].data.iter().map(|&x| x as f64).collect() };
    let linear = |x: &[Vec<f64>], name: &str, bias: bool| -> Vec<Vec<f64>> {
        let t = &w[&format!("{name}.weight")];
        let (out, inp) = (t.shape[0], t.shape[1]);
        let b = if bias {
            get(&format!("{name}.bias"))
        } else {
            vec![0.0; out]
        };
        x.iter()
            .map(|row| {
                (0..out)
                    .map(|o| {
                        b[o] + (0..inp)
                            .map(|k| row[k] * t.data[o * inp + k] as f64)
                            .sum::<f64>()
                    })
                    .collect()
            })
            .collect()
    };
    let rms = |x: &[Vec<f64>], name: &str| -> Vec<Vec<f64>> {
        let g = get(name);
        x.iter()
            .map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
                let r = 1.0 / (ms + 1e-5).sqrt();
                row.iter().zip(&g).map(|(v, g)| v * r * g).collect()
            })
            .collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        let half = hd / 2;
        for i in 0..half {
            let f = 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64);
            let (c, sn) = ((pos as f64 * f).cos(), (pos as f64 * f).sin());
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * c - b * sn;
            x[i + half] = b * c + a * sn;
        }
    };
    let emb = get("model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let xn = rms(&x, &format!("{p}.input_layernorm.weight"));
        let mut q = linear(&xn, &format!("{p}.self_attn.q_proj"), s.qkv_bias());
        let mut k = linear(&xn, &format!("{p}.self_attn.k_proj"), s.qkv_bias());
        let v = linear(&xn, &format!("{p}.self_attn.v_proj"), s.qkv_bias());
        for t in 0..n {
            for hh in 0..nh {
                rope(&mut q[t][hh * hd..(hh + 1) * hd], t);
            }
            for hh in 0..nkv {
                rope(&mut k[t][hh * hd..(hh + 1) * hd], t);
            }
        }
        let mut att = vec![vec![0f64; nh * hd]; n];
        for hh in 0..nh {
            let kvh = hh / (nh / nkv);
            for i in 0..n {
                let visible = |j: usize| j <= i && s.sliding_window.is_none_or(|wdw| i - j < wdw);
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        if visible(j) {
                            (0..hd)
                                .map(|d| q[i][hh * hd + d] * k[j][kvh * hd + d])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    att[i][hh * hd + d] = (0..n).map(|j| e[j] / z * v[j][kvh * hd + d]).sum();
                }
            }
        }
        let o = linear(&att, &format!("{p}.self_attn.o_proj"), false);
        for t in 0..n {
            for d in 0..h {
                x[t][d] += o[t][d];
            }
        }
        let xn = rms(&x, &format!("{p}.post_attention_layernorm.weight"));
        let g = linear(&xn, &format!("{p}.mlp.gate_proj"), false);
        let u = linear(&xn, &format!("{p}.mlp.up_proj"), false);
        let act: Vec<Vec<f64>> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| {
                g.iter()
                    .zip(u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect()
            })
            .collect();
        let dn = linear(&act, &format!("{p}.mlp.down_proj"), false);
        for t in 0..n {
            for d in 0..h {
                x[t][d] += dn[t][d];
            }
        }
    }
    let xn = rms(&x, "model.norm.weight");
    let head = if s.tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let hw = get(head);
    xn.iter()
        .map(|row| {
            (0..s.vocab)
                .map(|o| (0..h).map(|k| row[k] * hw[o * h + k]).sum())
                .collect()
        })
        .collect()
}

fn load(dir: &std::path::Path) -> CausalLm {
    let files = resolve_model(dir.to_str().unwrap(), None).unwrap();
    bitsmith::load_model(&files, DType::F32, &Device::Cpu).unwrap()
}

fn ids(s: &Synth, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + 3) % s.vocab) as u32).collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn forward_matches_float64_reference_for_each_architecture() {
    let cases = [
        Synth::default(),
        Synth {
            arch: "Qwen2ForCausalLM",
            tied: false,
            ..Synth::default()
        },
        Synth {
            arch: "MistralForCausalLM",
            tied: false,
            sliding_window: Some(4),
            ..Synth::default()
        },
        // widths that are not multiples of 32, odd head count
        Synth {
            hidden: 40,
            intermediate: 72,
            heads: 5,
            kv_heads: 1,
            ..Synth::default()
        },
    ];
    for (i, s) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let w = s.write(dir.path(), 10 + i as u64, i == 1);
        let m = load(dir.path());
        let ids = ids(s, 11);
        let got = logits(&m, &ids);
        let want = reference_logits(s, &w, &ids);
        let scale = want.iter().flatten().fold(0f64, |a, b| a.max(b.abs()));
        let err = max_abs_diff(&got, &want);
        assert!(
            err <= 2e-5 * scale.max(1.0),
            "{}: max |Δlogit| {err} (scale {scale})",
            s.arch
        );
    }
}

#[test]
fn block_streamed_forward_equals_whole_model_forward() {
    let s = Synth {
        bf16: true,
        ..Synth::default()
    };
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 3, false);
    let m = load(dir.path());
    let ids = ids(&s, 13);
    let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let ctx = m.context(ids.len()).unwrap();
    let mut x = m.embed(&input).unwrap();
    for block in &m.blocks {
        x = block.forward(&x, &ctx).unwrap();
    }
    let streamed: Vec<Vec<f32>> = m.head(&x).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    assert_eq!(streamed, logits(&m, &ids));
}

#[test]
fn bf16_weights_load_exactly() {
    let s = Synth {
        bf16: true,
        ..Synth::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let w = s.write(dir.path(), 5, false);
    // the writer rounded the values to bf16; the reference uses those rounded values
    let ids = ids(&s, 9);
    let got = logits(&load(dir.path()), &ids);
    let want = reference_logits(&s, &w, &ids);
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

/// Quantize with RTN, pack, reload; compare against the same codes applied in memory.
fn pack_round_trip(
    s: &Synth,
    bits: u8,
    group: GroupSize,
    sym: bool,
    zeros: ZeroConvention,
    lm_head: bool,
) {
    // held whole: its folders live as long as it does
    let p: RtnPacked = rtn_packed(s, bits, group, sym, zeros, lm_head);
    let (config, store) = (&p.config, &p.store);
    let packed = load(&p.packed);
    let mut fake = CausalLm::load_dense(config, store, DType::F32, &Device::Cpu).unwrap();
    bitsmith::quant::apply_quantized(&mut fake, &p.layers).unwrap();
    let ids = ids(s, 10);
    let a = logits(&packed, &ids);
    let b = logits(&fake, &ids);
    assert_eq!(
        a, b,
        "packed reload differs from fake quant: bits {bits} {group:?} sym {sym}"
    );
    let dense = logits(
        &CausalLm::load_dense(config, store, DType::F32, &Device::Cpu).unwrap(),
        &ids,
    );
    assert_ne!(a, dense, "quantization changed nothing");
}

#[test]
fn packed_reload_equals_fake_quant() {
    let s = Synth::default();
    for bits in [2, 3, 4, 8] {
        pack_round_trip(
            &s,
            bits,
            GroupSize::Columns(32),
            false,
            ZeroConvention::V1,
            false,
        );
    }
    pack_round_trip(
        &s,
        4,
        GroupSize::PerChannel,
        true,
        ZeroConvention::V2,
        false,
    );
    pack_round_trip(
        &s,
        3,
        GroupSize::Columns(64),
        true,
        ZeroConvention::V1,
        true,
    );
    // 40/72-wide layers: partial groups and padded packing
    let odd = Synth {
        hidden: 40,
        intermediate: 72,
        heads: 5,
        kv_heads: 1,
        ..Synth::default()
    };
    pack_round_trip(
        &odd,
        4,
        GroupSize::Columns(32),
        false,
        ZeroConvention::V1,
        false,
    );
    pack_round_trip(
        &odd,
        3,
        GroupSize::Columns(128),
        false,
        ZeroConvention::V2,
        false,
    );
    // biases (Qwen2) survive packing
    let qwen = Synth {
        arch: "Qwen2ForCausalLM",
        tied: false,
        ..Synth::default()
    };
    pack_round_trip(
        &qwen,
        8,
        GroupSize::Columns(64),
        false,
        ZeroConvention::V1,
        false,
    );
}
