//! The pipeline's stages compose: every combination of {no transform, Hadamard rotation} ×
//! {uniform, BAQ allocation, BAQ on power codebooks} × {RTN, GPTQ, FlexRound block-wise from
//! RTN, FlexRound layer-wise from GPTQ} on synthetic models (FlexRound on power codebooks:
//! refused, not built) runs through the library
//! call `bitsmith quantize` makes, is written, reloads, and equals its in-memory result;
//! the rotated float model computes what the original does.

mod common;

use bitsmith::calibration::CalibrationSet;
use bitsmith::infer::{load_model_with, WeightMode};
use bitsmith::loader::{resolve_model, SourceDType};
use bitsmith::model::CausalLm;
use bitsmith::pack::{
    codes_refs, quantization_config, write_quantized_model, OutputFolder, ZeroConvention,
};
use bitsmith::quant::flexround::{FlexInit, FlexRoundSpec, Reconstruct};
use bitsmith::quant::grid::{PowerLevels, RangeFit};
use bitsmith::quant::recipe::{
    AllocationSpec, BaqScope, BaqSpec, CalibrationSpec, GptqSpec, Recipe, RoundingSpec,
    TransformSpec,
};
use bitsmith::quant::transform::{HadamardRotation, Transform};
use bitsmith::quant::{quantize, GridSpec, GroupSize, LayerCodes, RunOptions, SourceModel};
use candle_core::{DType, Device};
use common::{logits, max_rel_diff, Synth};
use serde_json::json;

fn calib(s: &Synth) -> CalibrationSet {
    let segments = (0..6)
        .map(|i| {
            (0..24)
                .map(|t| ((t * 31 + i * 17 + 5) % s.vocab) as u32)
                .collect()
        })
        .collect();
    CalibrationSet {
        segments,
        seqlen: 24,
        description: "synthetic".into(),
    }
}

/// The allocations every combination runs: one uniform grid, BAQ's widths on uniform
/// grids, BAQ's widths on power codebooks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Alloc {
    Uniform,
    Baq,
    BaqCodebook,
}

fn recipe(rotate: bool, alloc: Alloc, rounding: RoundingSpec) -> Recipe {
    let baq = alloc != Alloc::Uniform;
    Recipe {
        transforms: if rotate {
            vec![TransformSpec::Hadamard {
                seed: 5,
                f32_head: false,
            }]
        } else {
            vec![]
        },
        allocation: if baq {
            AllocationSpec::Baq(BaqSpec {
                bits: 3.5,
                allowed_bits: vec![2, 3, 4, 5, 6, 8],
                theta: 1.95,
                code_bits: true,
                scope: BaqScope::Layer,
                group_size: GroupSize::Columns(16),
                sym: false,
                // the searched range rides along with the rotation, so both fits are covered
                range: if rotate {
                    RangeFit::search()
                } else {
                    RangeFit::MinMax
                },
                measurement: None,
                codebook: (alloc == Alloc::BaqCodebook).then_some(PowerLevels::Extended),
            })
        } else {
            AllocationSpec::Uniform {
                grid: GridSpec::Uniform {
                    bits: 3,
                    group_size: GroupSize::Columns(32),
                    sym: rotate,
                    range: if rotate {
                        RangeFit::FullRange
                    } else {
                        RangeFit::MinMax
                    },
                },
            }
        },
        rounding,
        calibration: CalibrationSpec::default(),
        lm_head: false,
    }
}

fn roundings() -> [RoundingSpec; 4] {
    let flex = FlexRoundSpec {
        iters: 20,
        batch: 2,
        lr: 5e-3,
        ..FlexRoundSpec::default()
    };
    [
        RoundingSpec::Rtn,
        RoundingSpec::Gptq(GptqSpec::default()),
        RoundingSpec::FlexRound(flex),
        RoundingSpec::FlexRound(FlexRoundSpec {
            init: FlexInit::Gptq,
            reconstruct: Reconstruct::Layer,
            ..flex
        }),
    ]
}

#[test]
fn rotated_float_model_computes_the_same_function() {
    let cases = [
        // power-of-two width, tied head
        Synth::default(),
        // 96 = 8·12 (a Paley factor), untied head, Qwen2 biases
        Synth {
            arch: "Qwen2ForCausalLM",
            hidden: 96,
            heads: 6,
            kv_heads: 2,
            tied: false,
            ..Synth::default()
        },
        // Mistral with a sliding window, bf16 weights
        Synth {
            arch: "MistralForCausalLM",
            sliding_window: Some(5),
            bf16: true,
            ..Synth::default()
        },
    ];
    for s in cases {
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), 11, false);
        let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
        let original =
            CausalLm::load_dense(&source.config, &source.store, DType::F32, &Device::Cpu).unwrap();
        // a bf16 source keeps its rotated head and embedding in bf16 unless asked for f32
        let heads: &[bool] = if s.bf16 { &[true, false] } else { &[false] };
        for &f32_head in heads {
            let t = HadamardRotation { seed: 1, f32_head }
                .apply(
                    &source.config,
                    &source.store,
                    &bitsmith::quant::transform::TransformContext::none(),
                )
                .unwrap();
            assert!(!t.config.tie_word_embeddings);
            let rounded = s.bf16 && !f32_head;
            for name in ["lm_head.weight", "model.embed_tokens.weight"] {
                let want = if rounded {
                    SourceDType::BF16
                } else {
                    SourceDType::F32
                };
                assert_eq!(
                    t.store.read_raw(name).unwrap().0,
                    want,
                    "{} `{name}`",
                    s.arch
                );
            }
            let rotated =
                CausalLm::load_dense(&t.config, &t.store, DType::F32, &Device::Cpu).unwrap();
            let (a, b) = (
                logits(&rotated, &s.probe_ids()),
                logits(&original, &s.probe_ids()),
            );
            let rel = max_rel_diff(&a, &b);
            // bf16 keeps 8 significant bits (roundoff 2^-9) of the two tensors every logit reads
            let bound = if rounded { 1e-2 } else { 1e-5 };
            assert!(
                rel < bound,
                "{} f32 head {f32_head}: rotated logits differ by {rel:e} (relative)",
                s.arch
            );
            // and the weights did change: the rotation is not the identity
            let q = "model.layers.0.self_attn.q_proj.weight";
            let shape = [s.heads * s.head_dim(), s.hidden];
            assert_ne!(
                t.store.f32_vec(q, &shape).unwrap(),
                source.store.f32_vec(q, &shape).unwrap()
            );
        }
    }
}

#[test]
fn every_stage_combination_is_written_and_reloads_as_computed() {
    let s = Synth {
        hidden: 96,
        heads: 6,
        kv_heads: 3,
        intermediate: 64,
        ..Synth::default()
    };
    let dir = tempfile::tempdir().unwrap();
    s.write(dir.path(), 3, false);
    let source = SourceModel::open(dir.path().to_str().unwrap(), None).unwrap();
    let cal = calib(&s);
    let float =
        CausalLm::load_dense(&source.config, &source.store, DType::F32, &Device::Cpu).unwrap();
    let float_logits = logits(&float, &s.probe_ids());
    for rotate in [false, true] {
        for alloc in [Alloc::Uniform, Alloc::Baq, Alloc::BaqCodebook] {
            for rounding in roundings() {
                let case = format!("rotate {rotate} {alloc:?} {rounding:?}");
                let r = recipe(rotate, alloc, rounding);
                if alloc == Alloc::BaqCodebook && matches!(rounding, RoundingSpec::FlexRound(_)) {
                    // not built: refused before any work, with the reason
                    let e = quantize(&source, &r, Some(&cal), &RunOptions::default())
                        .err()
                        .unwrap_or_else(|| panic!("{case}: FlexRound ran on power codebooks"));
                    assert!(
                        format!("{e:#}")
                            .contains("FlexRound does not run on BAQ's power codebooks"),
                        "{case}: {e:#}"
                    );
                    continue;
                }
                let q = quantize(&source, &r, Some(&cal), &RunOptions::default())
                    .unwrap_or_else(|e| panic!("{case}: {e:#}"));
                if alloc == Alloc::BaqCodebook {
                    assert!(
                        q.layers
                            .iter()
                            .all(|(_, c)| matches!(c, LayerCodes::MixedCodebook(_))),
                        "{case}"
                    );
                }
                assert_eq!(q.layers.len(), 7 * s.layers, "{case}");
                // the quantized model in memory: the transformed float model with the
                // dequantized codes swapped in
                let mut mem =
                    CausalLm::load_dense(&q.config, &q.store, DType::F32, &Device::Cpu).unwrap();
                for (spec, codes) in &q.layers {
                    mem.set_linear_weights(&spec.name, codes.dequantize())
                        .unwrap();
                }
                let want = logits(&mem, &s.probe_ids());

                let out_root = tempfile::tempdir().unwrap();
                let target = out_root.path().join("packed");
                let out = OutputFolder::create(&target, false).unwrap();
                let refs = codes_refs(&q.layers).unwrap();
                write_quantized_model(
                    &out,
                    &source.files,
                    &q.config,
                    &q.store,
                    &refs,
                    ZeroConvention::V1,
                    &quantization_config(&r, ZeroConvention::V1).unwrap(),
                    json!({ "recipe": r }),
                    1 << 20,
                )
                .unwrap();
                out.commit().unwrap();
                let files = resolve_model(target.to_str().unwrap(), None).unwrap();
                let reloaded =
                    load_model_with(&files, DType::F32, &Device::Cpu, WeightMode::Dequantized)
                        .unwrap();
                assert_eq!(
                    logits(&reloaded, &s.probe_ids()),
                    want,
                    "{case}: reload differs"
                );
                let packed = load_model_with(
                    &files,
                    DType::F32,
                    &Device::Cpu,
                    WeightMode::Packed(Default::default()),
                )
                .unwrap();
                let rel = max_rel_diff(&logits(&packed, &s.probe_ids()), &want);
                assert!(rel < 1e-4, "{case}: packed kernels differ by {rel:e}");
                // quantization moved the model, but not far
                let moved = max_rel_diff(&want, &float_logits);
                assert!(moved > 0.0 && moved < 0.5, "{case}: moved {moved}");
            }
        }
    }
}
