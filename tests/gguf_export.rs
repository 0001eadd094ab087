//! GGUF export on synthetic models, read back by independent readers: candle's GGUF reader
//! (every tensor's dequantized values equal the values bitsmith means the file to hold, bit
//! for bit, for every type; quantized layers equal their own dequantized weights), the
//! `gguf` Python package (`scripts/gguf_check.py`, skipped with a reason when no Python
//! with `gguf` is found), and a GGUF → float folder import whose perplexity equals the
//! quantized model's.

mod common;

use bitsmith::loader::{ModelConfig, WeightStore};
use bitsmith::model::block_linears;
use bitsmith::pack::gguf::{import_gguf, GgmlType, ImportOptions};
use bitsmith::pack::{read_quantized_linear, GptqConfig};
use common::{
    bitsmith_offline, candle_tensors, failed, logits, max_rel_diff, succeeded, synthetic_text,
    write_tokenizer, Synth,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn read_f32_safetensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let raw = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, v)
        })
        .collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// convert_hf_to_gguf's rotary reordering, written out independently: row `2i + s` of a
/// head comes from row `s·d/2 + i`.
fn hf_rows_to_gguf(w: &[f32], cols: usize, heads: usize) -> Vec<f32> {
    let d = w.len() / cols / heads;
    let mut out = vec![];
    for h in 0..heads {
        for i in 0..d / 2 {
            for s in 0..2 {
                let r = h * d + s * d / 2 + i;
                out.extend_from_slice(&w[r * cols..(r + 1) * cols]);
            }
        }
    }
    out
}

/// GGUF name of each HF tensor and the heads its rows are reordered over.
fn gguf_name(hf: &str, s: &Synth) -> (String, Option<usize>) {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return (g.to_string(), None);
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, leaf) = rest.split_once('.').unwrap();
    let table = [
        ("input_layernorm.weight", "attn_norm.weight", None),
        ("post_attention_layernorm.weight", "ffn_norm.weight", None),
        ("self_attn.q_proj.weight", "attn_q.weight", Some(s.heads)),
        ("self_attn.k_proj.weight", "attn_k.weight", Some(s.kv_heads)),
        ("self_attn.v_proj.weight", "attn_v.weight", None),
        ("self_attn.o_proj.weight", "attn_output.weight", None),
        ("mlp.gate_proj.weight", "ffn_gate.weight", None),
        ("mlp.up_proj.weight", "ffn_up.weight", None),
        ("mlp.down_proj.weight", "ffn_down.weight", None),
    ];
    let (_, g, p) = table.iter().find(|(h, _, _)| *h == leaf).unwrap();
    (format!("blk.{layer}.{g}"), *p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `export SRC --type TY --embedding-type TY --no-vocab -o OUT --reference-weights REFW`:
/// every tensor in one block type, with bitsmith's decoded values beside the file.
fn export_with_reference(
    src: &Path,
    ty: GgmlType,
    out: &Path,
    refw: &Path,
    cwd: &Path,
) -> std::process::Output {
    bitsmith_offline(
        &[
            "export",
            s(src),
            "--type",
            ty.name(),
            "--embedding-type",
            ty.name(),
            "--no-vocab",
            "-o",
            s(out),
            "--reference-weights",
            s(refw),
        ],
        cwd,
    )
}

/// A float model exported as every type: candle's decoding equals bitsmith's reference
/// values bit for bit; F32 holds the checkpoint's weights exactly, in llama.cpp's row
/// order; the other types stay within their rounding of them.
#[test]
fn every_type_reads_back_in_candle_as_bitsmith_decodes_it() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    // widths that are whole 256-weight super-blocks, so the K-quants are not replaced by
    // their 32-weight fallbacks
    let syn = Synth {
        tied: false,
        hidden: 256,
        intermediate: 512,
        ..Synth::default()
    };
    let hf = syn.write(&src, 11, false);
    write_tokenizer(&src, syn.vocab);
    // candle's GGUF reader has no IQ4_NL (the `gguf` package checks it, below)
    for ty in GgmlType::ALL.into_iter().filter(|&t| t != GgmlType::Iq4Nl) {
        let (out, refw) = (
            work.path().join(format!("{ty}.gguf")),
            work.path().join(format!("{ty}.st")),
        );
        let r = succeeded(
            &export_with_reference(&src, ty, &out, &refw, work.path()),
            "export",
        );
        assert_eq!(r["linear_type"], ty.name());
        assert_eq!(r["exact"], false);
        let got = candle_tensors(&out);
        let want = read_f32_safetensors(&refw);
        assert_eq!(
            got.len(),
            hf.len(),
            "{ty}: one GGUF tensor per checkpoint tensor"
        );
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (name, t) in &hf {
            let (g, heads) = gguf_name(name, &syn);
            let (gty, shape, values) = &got[&g];
            assert_eq!(shape, &t.shape, "{g}");
            let expect_ty = if t.shape.len() == 1 { "F32" } else { ty.name() };
            // candle spells the K-quants without the underscore (Q4K)
            assert_eq!(
                gty.to_uppercase().replace('_', ""),
                expect_ty.replace('_', ""),
                "{g}"
            );
            assert!(
                same_bits(values, &want[&g]),
                "{ty} {g}: candle and bitsmith decode differently"
            );
            let cols = *t.shape.last().unwrap();
            let original = match heads {
                Some(h) => hf_rows_to_gguf(&t.data, cols, h),
                None => t.data.clone(),
            };
            if expect_ty == "F32" {
                assert!(
                    same_bits(values, &original),
                    "{ty} {g}: F32 must hold the weights as they are"
                );
            } else {
                // a generous bound for every type: a 4-bit step of the block's range (two
                // and three bits: a half and a third of its largest magnitude)
                let bound = match ty {
                    GgmlType::Q2K => 1.0 / 2.0,
                    GgmlType::Q3K => 1.0 / 3.0,
                    _ => 1.0 / 7.0,
                };
                for (xb, yb) in original.chunks(32).zip(values.chunks(32)) {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (x, y) in xb.iter().zip(yb) {
                        assert!((x - y).abs() <= amax * bound + 1e-6, "{ty} {g}: {x} -> {y}");
                    }
                }
            }
        }
    }
}

/// Export → import for every type, IQ4_NL included (candle's reader has no IQ4_NL:
/// bitsmith reads the header itself and decodes that type with its own decoder): the
/// imported folder's weights, put back in llama.cpp's row order, are the exported file's
/// reference values bit for bit. bitsmith's header reader agrees with candle's on a file
/// candle reads (tensor names, shapes, offsets, data offset, metadata).
#[test]
fn every_type_imports_back_to_its_values() {
    use bitsmith::pack::gguf::reader::read_header;
    use candle_core::quantized::gguf_file::Content;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth {
        tied: false,
        hidden: 256,
        intermediate: 512,
        ..Synth::default()
    };
    let hf = syn.write(&src, 13, false);
    write_tokenizer(&src, syn.vocab);
    for ty in [GgmlType::Iq4Nl, GgmlType::Q4K, GgmlType::Q8_0] {
        let (out, refw, back) = (
            work.path().join(format!("{ty}.gguf")),
            work.path().join(format!("{ty}.st")),
            work.path().join(format!("{ty}-back")),
        );
        succeeded(
            &export_with_reference(&src, ty, &out, &refw, work.path()),
            "export",
        );
        succeeded(
            &bitsmith_offline(
                &[
                    "convert",
                    s(&out),
                    "--tokenizer-from",
                    s(&src),
                    "-o",
                    s(&back),
                ],
                work.path(),
            ),
            "convert",
        );
        let want = read_f32_safetensors(&refw);
        let got = read_f32_safetensors(&back.join("model.safetensors"));
        assert_eq!(got.len(), hf.len(), "{ty}: every tensor imported");
        for (name, t) in &hf {
            let (g, heads) = gguf_name(name, &syn);
            let cols = *t.shape.last().unwrap();
            let values = match heads {
                Some(h) => hf_rows_to_gguf(&got[name], cols, h),
                None => got[name].clone(),
            };
            assert!(
                same_bits(&values, &want[&g]),
                "{ty} {name}: imported values differ from the exported file's"
            );
        }
        if ty != GgmlType::Iq4Nl {
            let mut f = std::fs::File::open(&out).unwrap();
            let ours = read_header(&mut f).unwrap();
            let mut f = std::fs::File::open(&out).unwrap();
            let theirs = Content::read(&mut f).unwrap();
            assert_eq!(ours.data_offset, theirs.tensor_data_offset, "{ty}");
            assert_eq!(ours.tensors.len(), theirs.tensor_infos.len());
            for (n, t) in &theirs.tensor_infos {
                assert_eq!(ours.tensors[n].dims, t.shape.dims(), "{ty} {n}");
                assert_eq!(ours.tensors[n].offset, t.offset, "{ty} {n}");
            }
            assert_eq!(ours.metadata.len(), theirs.metadata.len());
            for (k, v) in &theirs.metadata {
                assert_eq!(
                    format!("{:?}", ours.metadata[k]),
                    format!("{v:?}"),
                    "{ty} metadata {k}"
                );
            }
        }
    }
}

/// Symmetric w4 (groups 32 and 64) and w8 models convert code for code: the GGUF's
/// weights, decoded by candle and put back in Hugging Face row order, are bitsmith's own
/// dequantized weights bit for bit. Grids that are no block type are refused with the
/// types they do convert to.
#[test]
fn symmetric_w4_and_w8_convert_code_for_code() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth::default();
    syn.write(&src, 5, false);
    write_tokenizer(&src, syn.vocab);
    for (bits, g, ty) in [
        ("4", "32", "Q4_0"),
        ("4", "64", "Q4_0"),
        ("8", "32", "Q8_0"),
    ] {
        let q = work.path().join(format!("w{bits}g{g}"));
        succeeded(
            &bitsmith_offline(
                &[
                    "quantize",
                    s(&src),
                    "--bits",
                    bits,
                    "--group-size",
                    g,
                    "--sym",
                    "-o",
                    s(&q),
                    "--quiet",
                ],
                work.path(),
            ),
            "quantize",
        );
        let out = work.path().join(format!("w{bits}g{g}.gguf"));
        let r = succeeded(
            &bitsmith_offline(&["export", s(&q), "--no-vocab", "-o", s(&out)], work.path()),
            "export",
        );
        assert_eq!(
            (
                r["linear_type"].as_str().unwrap(),
                r["exact"].as_bool().unwrap()
            ),
            (ty, true)
        );
        let got = candle_tensors(&out);
        let c = ModelConfig::from_file(&q.join("config.json")).unwrap();
        let store = WeightStore::open(&[q.join("model.safetensors")]).unwrap();
        let qcfg = GptqConfig::from_model_config(&c.raw).unwrap().unwrap();
        for layer in 0..c.num_hidden_layers {
            for spec in block_linears(&c, layer) {
                let (g_name, heads) = gguf_name(&format!("{}.weight", spec.name), &syn);
                let (gty, _, values) = &got[&g_name];
                assert_eq!(gty.to_uppercase(), ty);
                let own = read_quantized_linear(&store, &spec, &qcfg)
                    .unwrap()
                    .dequantize();
                let own = match heads {
                    Some(h) => hf_rows_to_gguf(&own, spec.in_features, h),
                    None => own,
                };
                assert!(
                    same_bits(values, &own),
                    "w{bits} g{g} {}: not code for code",
                    spec.name
                );
            }
        }
        let other = if ty == "Q4_0" { "Q8_0" } else { "Q4_0" };
        let e = failed(
            &bitsmith_offline(
                &[
                    "export",
                    s(&q),
                    "--no-vocab",
                    "--type",
                    other,
                    "-o",
                    s(&work.path().join("x.gguf")),
                ],
                work.path(),
            ),
            "export to another type",
        );
        assert!(
            e.contains(&format!("converts code for code to {ty}")),
            "{e}"
        );
    }
    let asym = work.path().join("asym");
    succeeded(
        &bitsmith_offline(
            &[
                "quantize",
                s(&src),
                "--bits",
                "4",
                "--group-size",
                "32",
                "-o",
                s(&asym),
                "--quiet",
            ],
            work.path(),
        ),
        "quantize",
    );
    let e = failed(
        &bitsmith_offline(
            &[
                "export",
                s(&asym),
                "--no-vocab",
                "-o",
                s(&work.path().join("y.gguf")),
            ],
            work.path(),
        ),
        "asym export",
    );
    assert!(e.contains("asym") && e.contains("w4 sym → Q4_0"), "{e}");
    assert!(!work.path().join("y.gguf").exists());
    // the dequantized weights are always exact as F32
    let r = succeeded(
        &bitsmith_offline(
            &[
                "export",
                s(&asym),
                "--no-vocab",
                "--type",
                "F32",
                "-o",
                s(&work.path().join("z.gguf")),
            ],
            work.path(),
        ),
        "asym as F32",
    );
    assert_eq!(r["linear_type"], "F32");
}

/// Rows that are not whole 32-weight blocks (a 48-wide model) are written as F16, as
/// llama.cpp's own quantizer falls back, and said so.
#[test]
fn rows_that_are_not_whole_blocks_fall_back_to_f16() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth {
        hidden: 48,
        heads: 4,
        kv_heads: 2,
        ..Synth::default()
    };
    syn.write(&src, 5, false);
    write_tokenizer(&src, syn.vocab);
    let out = work.path().join("m.gguf");
    let r = succeeded(
        &bitsmith_offline(
            &[
                "export",
                s(&src),
                "--type",
                "Q4_0",
                "--no-vocab",
                "-o",
                s(&out),
            ],
            work.path(),
        ),
        "export",
    );
    let fallbacks: Vec<&str> = r["fallbacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // q, k, v, gate, up read the 48-wide hidden state and o the 4 × 12 heads in every
    // layer; down reads the 96-wide MLP state
    assert_eq!(fallbacks.len(), 6 * syn.layers, "{fallbacks:?}");
    let got = candle_tensors(&out);
    assert_eq!(got["blk.0.attn_q.weight"].0, "F16");
    assert_eq!(got["blk.0.ffn_down.weight"].0, "Q4_0");
}

/// A K-quant layer whose input width is not whole 256-weight super-blocks takes
/// llama.cpp's fallback type (Q4_K → Q5_0, Q6_K → Q8_0), F16 when even that does not fit.
#[test]
fn k_quant_rows_fall_back_as_llama_cpp_does() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    // q, k, v, o, gate, up read 256 columns, down 96
    let syn = Synth {
        hidden: 256,
        intermediate: 96,
        heads: 4,
        kv_heads: 2,
        ..Synth::default()
    };
    syn.write(&src, 5, false);
    for (ty, fallback) in [("Q4_K", "Q5_0"), ("Q6_K", "Q8_0"), ("Q3_K", "Q4_0")] {
        let out = work.path().join(format!("{ty}.gguf"));
        let r = succeeded(
            &bitsmith_offline(
                &["export", s(&src), "--type", ty, "--no-vocab", "-o", s(&out)],
                work.path(),
            ),
            "export",
        );
        let fallbacks = r["fallbacks"].as_array().unwrap();
        assert_eq!(fallbacks.len(), syn.layers, "{ty}: {fallbacks:?}");
        assert!(
            fallbacks[0].as_str().unwrap().contains(fallback),
            "{ty}: {fallbacks:?}"
        );
        let got = candle_tensors(&out);
        assert_eq!(
            got["blk.0.attn_q.weight"].0.to_uppercase(),
            ty.replace('_', "")
        );
        assert_eq!(
            got["blk.0.ffn_up.weight"].0.to_uppercase(),
            ty.replace('_', "")
        );
        assert_eq!(got["blk.0.ffn_down.weight"].0.to_uppercase(), fallback);
        assert_eq!(got["blk.1.ffn_down.weight"].0.to_uppercase(), fallback);
    }
}

/// llama.cpp's named mixes give each tensor the type `llama-quantize` gives it (the
/// rules of `llama_tensor_get_type_impl`, written out here by hand for an 8-layer model).
#[test]
fn named_mixes_widen_the_tensors_llama_cpp_widens() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    // every linear whole 256-weight super-blocks; an untied head
    let syn = Synth {
        hidden: 256,
        intermediate: 256,
        layers: 8,
        heads: 4,
        kv_heads: 2,
        tied: false,
        ..Synth::default()
    };
    syn.write(&src, 6, false);
    let export = |ty: &str| {
        let out = work.path().join(format!("{ty}.gguf"));
        succeeded(
            &bitsmith_offline(
                &["export", s(&src), "--type", ty, "--no-vocab", "-o", s(&out)],
                work.path(),
            ),
            "export",
        );
        let mut f = std::fs::File::open(&out).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let file_type = c.metadata["general.file_type"].to_u32().unwrap();
        let types: BTreeMap<String, String> = c
            .tensor_infos
            .iter()
            .map(|(n, i)| (n.clone(), format!("{:?}", i.ggml_dtype).to_uppercase()))
            .collect();
        (file_type, types)
    };
    // use_more_bits(i, 8): the first and last eighth, and every third from n/8
    let more = [0, 3, 6, 7];
    let (ft, t) = export("Q4_K_M");
    assert_eq!(ft, 15);
    for i in 0..8 {
        let wide = if more.contains(&i) { "Q6K" } else { "Q4K" };
        assert_eq!(t[&format!("blk.{i}.attn_v.weight")], wide, "layer {i}");
        assert_eq!(t[&format!("blk.{i}.ffn_down.weight")], wide, "layer {i}");
        for other in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            assert_eq!(t[&format!("blk.{i}.{other}.weight")], "Q4K", "{other} {i}");
        }
    }
    // the head Q6_K, the untied embedding the base type
    assert_eq!(t["output.weight"], "Q6K");
    assert_eq!(t["token_embd.weight"], "Q4K");
    assert_eq!(t["blk.0.attn_norm.weight"], "F32");

    let (ft, t) = export("Q3_K_M");
    assert_eq!(ft, 12);
    assert_eq!(t["blk.0.attn_v.weight"], "Q5K");
    assert_eq!(t["blk.1.attn_v.weight"], "Q5K");
    assert_eq!(t["blk.2.attn_v.weight"], "Q4K");
    assert_eq!(t["blk.5.attn_output.weight"], "Q4K");
    assert_eq!(t["blk.0.ffn_down.weight"], "Q4K"); // n/16 = 0 layers get Q5_K
    assert_eq!(t["blk.5.ffn_up.weight"], "Q3K");

    let (ft, t) = export("Q4_K_S");
    assert_eq!(ft, 14);
    assert_eq!(t["blk.3.attn_v.weight"], "Q5K");
    assert_eq!(t["blk.4.attn_v.weight"], "Q4K");
    assert_eq!(t["blk.0.ffn_down.weight"], "Q5K");
    assert_eq!(t["blk.1.ffn_down.weight"], "Q4K");

    // an explicit embedding type wins over the mix's choice
    let out = work.path().join("emb.gguf");
    succeeded(
        &bitsmith_offline(
            &[
                "export",
                s(&src),
                "--type",
                "Q5_K_M",
                "--embedding-type",
                "Q8_0",
                "--no-vocab",
                "-o",
                s(&out),
            ],
            work.path(),
        ),
        "export",
    );
    let got = candle_tensors(&out);
    assert_eq!(got["output.weight"].0, "Q8_0");
    assert_eq!(got["token_embd.weight"].0, "Q8_0");
    assert_eq!(got["blk.7.ffn_down.weight"].0, "Q6K");
    assert_eq!(got["blk.1.ffn_down.weight"].0, "Q5K");

    // Q2_K_S is refused without calibration, as llama-quantize refuses it without an imatrix
    let out = work.path().join("q2ks.gguf");
    let o = bitsmith_offline(
        &[
            "export",
            s(&src),
            "--type",
            "Q2_K_S",
            "--no-vocab",
            "-o",
            s(&out),
        ],
        work.path(),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--method gptq"), "{err}");
    assert!(!out.exists());
}

/// A Python with the `gguf` package: `BITSMITH_GGUF_PYTHON`, the fixture's venv, or
/// `python3`; `Err(reason)` when none can `import gguf, numpy`.
fn gguf_python() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = vec![];
    if let Some(p) = std::env::var_os("BITSMITH_GGUF_PYTHON") {
        candidates.push(p.into());
    }
    candidates.push(common::fixture_dir().join("venv/bin/python"));
    candidates.push("python3".into());
    for p in &candidates {
        let o = Command::new(p).args(["-c", "import gguf, numpy"]).output();
        if matches!(o, Ok(ref o) if o.status.success()) {
            return Ok(p.clone());
        }
    }
    Err(format!(
        "no Python with the `gguf` and `numpy` packages among {candidates:?} (pip install gguf numpy, or set BITSMITH_GGUF_PYTHON)"
    ))
}

/// The `gguf` package's reader and numpy dequantization agree with bitsmith bit for bit
/// on every type, from a float model and from quantized ones (converted code for code).
#[test]
fn gguf_package_dequantizes_every_tensor_as_bitsmith_does() {
    let python = match gguf_python() {
        Ok(p) => p,
        Err(why) => {
            println!("skipping the gguf-package check: {why}");
            return;
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gguf_check.py");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth::default();
    syn.write(&src, 9, false);
    write_tokenizer(&src, syn.vocab);
    let w4 = work.path().join("w4");
    succeeded(
        &bitsmith_offline(
            &[
                "quantize",
                s(&src),
                "--bits",
                "4",
                "--group-size",
                "32",
                "--sym",
                "-o",
                s(&w4),
                "--quiet",
            ],
            work.path(),
        ),
        "quantize",
    );
    let w8 = work.path().join("w8");
    succeeded(
        &bitsmith_offline(
            &[
                "quantize",
                s(&src),
                "--bits",
                "8",
                "--group-size",
                "32",
                "--sym",
                "-o",
                s(&w8),
                "--quiet",
            ],
            work.path(),
        ),
        "quantize",
    );
    // a 256-wide model for the K-quants (on the 64-wide one they fall back to 32-weight
    // types, which the runs below also check)
    let wide = work.path().join("wide");
    let wide_syn = Synth {
        hidden: 256,
        intermediate: 512,
        ..Synth::default()
    };
    wide_syn.write(&wide, 13, false);
    let mut runs: Vec<(PathBuf, Vec<String>)> = GgmlType::ALL
        .iter()
        .chain(GgmlType::ALL.iter().filter(|t| t.block_size() > 32))
        .enumerate()
        .map(|(i, t)| {
            (
                if i < GgmlType::ALL.len() {
                    src.clone()
                } else {
                    wide.clone()
                },
                vec![
                    "--type".to_string(),
                    t.name().to_string(),
                    "--embedding-type".into(),
                    t.name().into(),
                ],
            )
        })
        .collect();
    runs.push((w4, vec![]));
    runs.push((w8, vec![]));
    for (i, (model, extra)) in runs.iter().enumerate() {
        let (out, refw) = (
            work.path().join(format!("{i}.gguf")),
            work.path().join(format!("{i}.st")),
        );
        let mut args = vec![
            "export",
            s(model),
            "--no-vocab",
            "-o",
            s(&out),
            "--reference-weights",
            s(&refw),
        ];
        args.extend(extra.iter().map(String::as_str));
        succeeded(&bitsmith_offline(&args, work.path()), "export");
        let o = Command::new(&python)
            .arg(&script)
            .arg(&out)
            .arg(&refw)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "gguf_check.py {extra:?} on {}:\n{}{}",
            model.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Export → import round trip: the exact Q4_0 GGUF of a w4 g32 sym model, decoded by
/// candle into a float folder, has the perplexity of the quantized model dequantized
/// (the same weights; to 1e-12, the forward's summation order aside).
#[test]
fn imported_gguf_has_the_perplexity_of_its_weights() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth::default();
    syn.write(&src, 21, false);
    write_tokenizer(&src, syn.vocab);
    let text = work.path().join("text.txt");
    std::fs::write(&text, synthetic_text(syn.vocab, 3000, 4)).unwrap();
    let q = work.path().join("w4");
    succeeded(
        &bitsmith_offline(
            &[
                "quantize",
                s(&src),
                "--bits",
                "4",
                "--group-size",
                "32",
                "--sym",
                "-o",
                s(&q),
                "--quiet",
            ],
            work.path(),
        ),
        "quantize",
    );
    let gguf = work.path().join("w4.gguf");
    succeeded(
        &bitsmith_offline(
            &["export", s(&q), "--no-vocab", "-o", s(&gguf)],
            work.path(),
        ),
        "export",
    );
    let back = work.path().join("back");
    let opts = ImportOptions {
        tokenizer_from: Some(q.clone()),
        ..Default::default()
    };
    import_gguf(&gguf, &back, &opts).unwrap();
    let ppl = |m: &Path, extra: &[&str]| -> f64 {
        let mut args = vec!["ppl", s(m), "--text", s(&text), "--seqlen", "32", "--json"];
        args.extend_from_slice(extra);
        succeeded(&bitsmith_offline(&args, work.path()), "ppl")["ppl"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (ppl(&q, &["--weights", "dequantized"]), ppl(&back, &[]));
    assert!(a.is_finite() && a > 1.0);
    // the same weights (bit for bit, tested above); the forward's float sums may still be
    // split differently between threads from run to run (seen: 2 ulp on a loaded machine)
    assert!(
        (a - b).abs() <= 1e-12 * a,
        "ppl {a} (quantized, dequantized) vs {b} (GGUF imported)"
    );
}

/// A quantized output head (`--lm-head`) converts code for code like the block linears.
#[test]
fn quantized_head_converts_code_for_code() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth {
        tied: false,
        ..Synth::default()
    };
    syn.write(&src, 6, false);
    write_tokenizer(&src, syn.vocab);
    let q = work.path().join("w8");
    succeeded(
        &bitsmith_offline(
            &[
                "quantize",
                s(&src),
                "--bits",
                "8",
                "--group-size",
                "32",
                "--sym",
                "--lm-head",
                "-o",
                s(&q),
                "--quiet",
            ],
            work.path(),
        ),
        "quantize",
    );
    let out = work.path().join("w8.gguf");
    let r = succeeded(
        &bitsmith_offline(&["export", s(&q), "--no-vocab", "-o", s(&out)], work.path()),
        "export",
    );
    assert_eq!(r["exact"], true);
    let got = candle_tensors(&out);
    let c = ModelConfig::from_file(&q.join("config.json")).unwrap();
    let store = WeightStore::open(&[q.join("model.safetensors")]).unwrap();
    let qcfg = GptqConfig::from_model_config(&c.raw).unwrap().unwrap();
    let spec = bitsmith::model::spec::lm_head(&c);
    let own = read_quantized_linear(&store, &spec, &qcfg)
        .unwrap()
        .dequantize();
    let (ty, _, values) = &got["output.weight"];
    assert_eq!(ty, "Q8_0");
    assert!(same_bits(values, &own));
}

/// `export SRC --type F32 --no-vocab -o OUT`, which must succeed.
fn export_f32(src: &Path, out: &Path, cwd: &Path) {
    succeeded(
        &bitsmith_offline(
            &[
                "export",
                s(src),
                "--type",
                "F32",
                "--no-vocab",
                "-o",
                s(out),
            ],
            cwd,
        ),
        "export",
    );
}

/// `convert OUT --tokenizer-from SRC -o BACK`, which must succeed; BACK's config.json.
fn convert_back(out: &Path, src: &Path, back: &Path, cwd: &Path) -> serde_json::Value {
    succeeded(
        &bitsmith_offline(
            &["convert", s(out), "--tokenizer-from", s(src), "-o", s(back)],
            cwd,
        ),
        "convert",
    );
    serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap()
}

/// The float model of the folder `p`, in f32 on the CPU.
fn dense_model(p: &Path) -> bitsmith::model::CausalLm {
    let files = bitsmith::loader::resolve_model(p.to_str().unwrap(), None).unwrap();
    let config = ModelConfig::from_file(&files.config).unwrap();
    let store = WeightStore::open(&files.weights).unwrap();
    let dev = candle_core::Device::Cpu;
    bitsmith::model::CausalLm::load_dense(&config, &store, candle_core::DType::F32, &dev).unwrap()
}

/// Llama 3 RoPE scaling travels as llama.cpp's `rope_freqs` tensor: export writes the
/// factors `convert_hf_to_gguf.py` computes, import fits `rope_scaling` back from them, and
/// the imported model computes what the original does.
#[test]
fn llama3_rope_scaling_travels_as_rope_freqs() {
    use bitsmith::loader::RopeScaling;
    use bitsmith::pack::gguf::reader::read_header;
    use bitsmith::pack::gguf::rope_freqs::llama3_factors;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    // head_dim 64: five of its 32 frequencies fall between the two plateaus
    let syn = Synth {
        hidden: 256,
        intermediate: 512,
        ..Synth::default()
    };
    syn.write(&src, 21, false);
    write_tokenizer(&src, syn.vocab);
    let scaling = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024});
    let cfg_path = src.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = scaling.clone();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let (out, back) = (work.path().join("m.gguf"), work.path().join("back"));
    export_f32(&src, &out, work.path());
    let mut f = std::fs::File::open(&out).unwrap();
    let header = read_header(&mut f).unwrap();
    let mut f = std::fs::File::open(&out).unwrap();
    let factors: Vec<f32> = header
        .dequantize(&mut f, "rope_freqs.weight")
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 1024,
    };
    let head_dim = 256 / syn.heads;
    assert_eq!(factors, llama3_factors(head_dim, 10000.0, &want));
    assert_eq!(factors[0], 1.0);
    assert_eq!(factors[head_dim / 2 - 1], 8.0);

    let got = convert_back(&out, &src, &back, work.path());
    assert_eq!(got["rope_scaling"], scaling);
    // the same logits as the original (F32 weights: equal up to the sums' order)
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % syn.vocab as u32).collect();
    let (a, b) = (
        logits(&dense_model(&src), &ids),
        logits(&dense_model(&back), &ids),
    );
    assert!(max_rel_diff(&a, &b) < 1e-5, "{}", max_rel_diff(&a, &b));
    // and not the unscaled model's: the 40 positions reach the scaled frequencies
    cfg.as_object_mut().unwrap().remove("rope_scaling");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let c = logits(&dense_model(&src), &ids);
    assert!(max_rel_diff(&a, &c) > 1e-3, "{}", max_rel_diff(&a, &c));
}

/// Qwen2 exports as llama.cpp's `qwen2` architecture: its metadata under `qwen2.*`, q/k
/// rows in Hugging Face's order (llama.cpp rotates Qwen2's halves as transformers does),
/// the q/k/v biases; and imports back to a `Qwen2ForCausalLM` that computes what the
/// original does.
#[test]
fn qwen2_travels_as_llama_cpp_qwen2() {
    use bitsmith::pack::gguf::reader::read_header;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth {
        arch: "Qwen2ForCausalLM",
        tied: false,
        ..Synth::default()
    };
    let hf = syn.write(&src, 5, false);
    write_tokenizer(&src, syn.vocab);
    let (out, back) = (work.path().join("q.gguf"), work.path().join("back"));
    export_f32(&src, &out, work.path());
    let mut f = std::fs::File::open(&out).unwrap();
    let header = read_header(&mut f).unwrap();
    assert_eq!(
        header.metadata["general.architecture"].to_string().unwrap(),
        "qwen2"
    );
    assert_eq!(
        header.metadata["qwen2.attention.head_count_kv"]
            .to_u32()
            .unwrap(),
        syn.kv_heads as u32
    );
    let gguf_values = |name: &str| -> Vec<f32> {
        let mut f = std::fs::File::open(&out).unwrap();
        let t = header.dequantize(&mut f, name).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    for (g, h) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
    ] {
        let want = &hf[h].data;
        assert!(same_bits(&gguf_values(g), want), "{g}: not {h} as it is");
    }
    let cfg = convert_back(&out, &src, &back, work.path());
    assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
    let ids: Vec<u32> = (0..20).map(|i| (i * 5 + 1) % syn.vocab as u32).collect();
    let (a, b) = (
        logits(&dense_model(&src), &ids),
        logits(&dense_model(&back), &ids),
    );
    assert!(max_rel_diff(&a, &b) < 1e-6, "{}", max_rel_diff(&a, &b));
}
