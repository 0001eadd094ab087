//! `bitsmith quantize --format gguf --type T`: linears solved directly on a GGML block type
//! and written as a llama.cpp file. RTN on the block grid writes exactly the file `export
//! --type T` writes (ggml's reference quantizer, byte for byte); GPTQ writes blocks of the
//! same type that candle's independent GGUF reader decodes; misuse is refused before any
//! work.

mod common;

use common::{
    bitsmith_offline, candle_tensors, failed, succeeded, synthetic_text, write_tokenizer, Synth,
};
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn quantize_solves_linears_on_ggml_blocks() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    // q, k, v, o, gate, up read 256 columns and down 512: whole Q4_K super-blocks
    let syn = Synth {
        hidden: 256,
        intermediate: 512,
        ..Synth::default()
    };
    syn.write(&src, 3, false);
    write_tokenizer(&src, syn.vocab);
    let run = |args: &[&str]| bitsmith_offline(args, work.path());

    // RTN on the block grid: the very file export writes (ggml's reference rounding)
    let rtn = work.path().join("rtn.gguf");
    let exported = work.path().join("exported.gguf");
    succeeded(
        &run(&[
            "quantize",
            s(&src),
            "--format",
            "gguf",
            "--type",
            "Q4_K",
            "--method",
            "rtn",
            "--no-vocab",
            "-o",
            s(&rtn),
            "--quiet",
        ]),
        "quantize rtn",
    );
    succeeded(
        &run(&[
            "export",
            s(&src),
            "--type",
            "Q4_K",
            "--no-vocab",
            "-o",
            s(&exported),
        ]),
        "export",
    );
    assert!(
        std::fs::read(&rtn).unwrap() == std::fs::read(&exported).unwrap(),
        "RTN on Q4_K blocks must write export's file byte for byte"
    );

    // and with one of llama.cpp's mixes (Q6_K on some attn_v and ffn_down, Q6_K head)
    let (rtn_mix, exported_mix) = (work.path().join("m.gguf"), work.path().join("em.gguf"));
    let (r, e) = (s(&rtn_mix), s(&exported_mix));
    let quantize_mix = [
        "quantize",
        s(&src),
        "--format",
        "gguf",
        "--type",
        "Q4_K_M",
        "--method",
        "rtn",
        "--no-vocab",
        "-o",
        r,
        "--quiet",
    ];
    succeeded(&run(&quantize_mix), "quantize rtn Q4_K_M");
    let export_mix = ["export", s(&src), "--type", "Q4_K_M", "--no-vocab", "-o", e];
    succeeded(&run(&export_mix), "export Q4_K_M");
    assert!(
        std::fs::read(&rtn_mix).unwrap() == std::fs::read(&exported_mix).unwrap(),
        "RTN on Q4_K_M must write export's file byte for byte"
    );
    // use_more_bits: the last eighth of the layers
    let last_v = format!("blk.{}.attn_v.weight", syn.layers - 1);
    assert_eq!(candle_tensors(&rtn_mix)[&last_v].0, "Q6K");

    // a recipe file naming the GGML grid writes the same GGUF
    let recipe = work.path().join("recipe.json");
    std::fs::write(
        &recipe,
        r#"{"allocation": {"kind": "uniform", "grid": {"kind": "ggml", "type": "Q4_K"}},
            "rounding": {"kind": "rtn"}}"#,
    )
    .unwrap();
    let from_recipe = work.path().join("recipe.gguf");
    succeeded(
        &run(&[
            "quantize",
            s(&src),
            "--recipe",
            s(&recipe),
            "--no-vocab",
            "-o",
            s(&from_recipe),
            "--quiet",
        ]),
        "quantize --recipe",
    );
    assert!(
        std::fs::read(&from_recipe).unwrap() == std::fs::read(&exported).unwrap(),
        "a GGML recipe must write the same file"
    );

    // GPTQ on the same blocks: a valid file of the same types, with other codes
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, synthetic_text(syn.vocab, 4000, 2)).unwrap();
    let gptq = work.path().join("gptq.gguf");
    let gptq_args = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "quantize".to_string(),
            s(&src).into(),
            "--format".into(),
            "gguf".into(),
            "--type".into(),
            "Q4_K".into(),
            "--method".into(),
            "gptq".into(),
            "--calib".into(),
            s(&calib).into(),
            "--nsamples".into(),
            "16".into(),
            "--seqlen".into(),
            "64".into(),
            "--no-vocab".into(),
            "-o".into(),
            s(out).into(),
            "--quiet".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let args = gptq_args(&gptq, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = run(&args);
    succeeded(&stdout, "quantize gptq");
    let text = String::from_utf8_lossy(&stdout.stdout);
    assert!(text.contains("gptq on Q4_K blocks"), "{text}");
    let (a, b) = (candle_tensors(&rtn), candle_tensors(&gptq));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut changed = 0;
    for (name, (ty, _, values)) in &b {
        assert_eq!(ty, &a[name].0, "{name}");
        if name.ends_with(".weight") && name.starts_with("blk.") && !name.contains("norm") {
            assert_eq!(ty, "Q4K", "{name}");
            changed += (values != &a[name].2) as usize;
        } else {
            // norms and the embedding are not quantized: the same as RTN's file
            assert_eq!(values, &a[name].2, "{name}");
        }
    }
    assert_eq!(changed, 7 * syn.layers, "every linear's codes moved");
    // no checkpoint is left next to the output
    assert!(!work.path().join(".gptq.gguf.checkpoint").exists());
    // nor a measurement file: GPTQ's own column losses are no BAQ pass 1
    assert!(!work.path().join("gptq.column_losses.safetensors").exists());

    // misuse, refused before any work and without writing OUT
    let out = work.path().join("bad.gguf");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--format", "gguf", "--method", "gptq"], "needs --type"),
        (
            vec!["--format", "gguf", "--type", "Q2_K_S", "--method", "rtn"],
            "needs calibration data",
        ),
        (vec!["--type", "Q4_K"], "--format gguf"),
        (
            vec!["--format", "gguf", "--type", "Q4_K"],
            "GGUF export writes BPE vocabularies",
        ),
        (
            vec![
                "--format", "gguf", "--type", "Q4_K", "--method", "baq", "--bits", "3.5",
            ],
            "drop --type",
        ),
        (
            vec!["--format", "gguf", "--method", "nupes"],
            "--method rtn, gptq or flexround",
        ),
        (
            vec!["--allowed-types", "Q4_K"],
            "--allowed-types is an option",
        ),
        (
            vec!["--format", "gguf", "--type", "Q4_K", "--group-size", "64"],
            "the GGML type (--type) fixes",
        ),
        (vec!["--format", "gguf", "--type", "F16"], "needs --type"),
        (
            vec!["--format", "gguf", "--type", "Q9_K"],
            "unknown GGUF type",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["quantize", s(&src), "-o", s(&out)];
        args.extend(flags.iter().copied());
        let e = failed(&run(&args), &format!("{flags:?}"));
        assert!(e.contains(want), "{flags:?}: {e}");
        assert!(!out.exists());
    }
    let args = gptq_args(&gptq, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = failed(&run(&args), "an existing output");
    assert!(e.contains("already exists"), "{e}");
    let args = gptq_args(&out, &["--act-order"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = failed(&run(&args), "act-order without static groups");
    assert!(e.contains("--static-groups"), "{e}");
    assert!(!out.exists());
}

/// `--method baq --format gguf`: one model-wide budget of stored bits over GGML block
/// types; the file holds at most that many bits per linear weight, mixes types, spends a
/// bigger budget on wider types, keeps its pass 1 beside the file for `--measurement`,
/// keeps to `--allowed-types`, and refuses a budget no type set fits.
#[test]
fn baq_allocates_ggml_types_under_a_model_wide_budget() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth {
        hidden: 256,
        intermediate: 512,
        layers: 3,
        ..Synth::default()
    };
    syn.write(&src, 4, false);
    write_tokenizer(&src, syn.vocab);
    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, synthetic_text(syn.vocab, 4000, 5)).unwrap();
    let run = |bits: &str, extra: &[&str]| {
        let out = work.path().join(format!("baq-{bits}-{}.gguf", extra.len()));
        let mut args = vec![
            "quantize",
            s(&src),
            "--format",
            "gguf",
            "--method",
            "baq",
            "--bits",
            bits,
            "--calib",
            s(&calib),
            "--nsamples",
            "8",
            "--seqlen",
            "64",
            "--no-vocab",
            "-o",
            s(&out),
            "--quiet",
        ];
        args.extend(extra);
        (bitsmith_offline(&args, work.path()), out)
    };
    // stored bits per weight of the linears, from candle's reading of the file
    let linear_bits = |path: &Path| {
        let mut f = std::fs::File::open(path).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let (mut bytes, mut weights) = (0f64, 0f64);
        let mut types = std::collections::BTreeSet::new();
        for (name, info) in &c.tensor_infos {
            if name.starts_with("blk.") && !name.contains("norm") {
                let n = info.shape.elem_count();
                let dt = info.ggml_dtype;
                bytes += (n / dt.block_size() * dt.type_size()) as f64;
                weights += n as f64;
                types.insert(format!("{dt:?}"));
            }
        }
        (bytes * 8.0 / weights, types)
    };
    let (o, low) = run("4.8", &[]);
    succeeded(&o, "baq 4.8");
    let (bits_low, types_low) = linear_bits(&low);
    assert!(bits_low <= 4.8, "{bits_low}");
    assert!(
        types_low.len() > 1,
        "a budget between types mixes them: {types_low:?}"
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("types "), "{text}");
    assert!(text.contains("on a mix of GGML types"), "{text}");

    // pass 1 is kept beside the file, and a run at another budget reuses it: the same
    // file as measuring again
    let measured = work.path().join("baq-4.8-0.column_losses.safetensors");
    assert!(measured.is_file());
    assert!(
        text.contains(&format!("--measurement {}", measured.display())),
        "{text}"
    );
    let (o, high) = run("6.5", &[]);
    succeeded(&o, "baq 6.5");
    let (bits_high, _) = linear_bits(&high);
    assert!(
        bits_high <= 6.5 && bits_high > bits_low,
        "{bits_low} → {bits_high}"
    );
    let (o, reused) = run("6.5", &["--measurement", s(&measured)]);
    succeeded(&o, "baq 6.5 --measurement");
    assert_eq!(
        std::fs::read(&reused).unwrap(),
        std::fs::read(&high).unwrap()
    );
    let missing = work.path().join("none.safetensors");
    let (o, bad) = run("5.9", &["--measurement", s(&missing)]);
    let err = failed(&o, "a missing measurement");
    assert!(err.contains("none.safetensors"), "{err}");
    assert!(!bad.exists());

    let (o, only) = run("6.0", &["--allowed-types", "Q4_K,Q8_0"]);
    succeeded(&o, "baq --allowed-types");
    let (bits_only, types_only) = linear_bits(&only);
    assert!(bits_only <= 6.0);
    assert!(
        types_only.iter().all(|t| t == "Q4K" || t == "Q8_0") && types_only.len() == 2,
        "{types_only:?}"
    );

    // one type allowed: no mix to speak of
    let (o, _) = run("8.5", &["--allowed-types", "Q8_0"]);
    succeeded(&o, "baq on one type");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("on Q8_0 blocks") && !text.contains("mix"),
        "{text}"
    );

    let (o, none) = run("3.0", &["--allowed-types", "Q4_0,Q8_0"]);
    let err = failed(&o, "a budget below every type");
    assert!(err.contains("cannot hold every linear"), "{err}");
    assert!(!none.exists());
}
