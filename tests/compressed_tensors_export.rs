//! compressed-tensors export on synthetic models: the folder is re-read here with a
//! reader written from the format's rules (compressed-tensors 0.20's `unpack_from_int32`
//! and `_dequantize`, independently of bitsmith's packer), and every linear's weights equal
//! bitsmith's own dequantized weights bit for bit; float tensors are copied byte for byte.
//! Layers the format cannot hold are refused by name. The package itself decompresses the
//! folder in `scripts/compressed_tensors_check.py` (skipped with a reason when no Python
//! with `compressed_tensors` is found).

mod common;

use bitsmith::loader::{ModelConfig, WeightStore};
use bitsmith::model::block_linears;
use bitsmith::pack::{read_quantized_linear, GptqConfig};
use common::{bitsmith_offline, failed, succeeded, synthetic_text, write_tokenizer, Synth};
use half::f16;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every tensor of a safetensors file: (dtype, shape, bytes).
type Raw = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                (
                    format!("{:?}", t.dtype()),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                ),
            )
        })
        .collect()
}

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Field `i` of a dense LSB-first stream of `bits`-bit values, as `unpack_from_int32`
/// extracts it (element i from global bit position i·bits, spilling into the next word).
fn field(stream: &[u32], bits: usize, i: usize) -> i32 {
    let mut v = 0u64;
    for t in 0..bits {
        let bit = i * bits + t;
        v |= (((stream[bit / 32] >> (bit % 32)) & 1) as u64) << t;
    }
    v as i32
}

/// compressed-tensors' dequantization of one `pack-quantized` linear in f32:
/// `(q − zp) · scale` with `q`, `zp` the stored fields minus `2^(bits−1)`.
fn ct_dequantize(t: &Raw, module: &str, qc: &Value) -> Vec<f32> {
    let w = &qc["config_groups"]["group_0"]["weights"];
    let bits = w["num_bits"].as_u64().unwrap() as usize;
    let offset = 1i32 << (bits - 1);
    let get = |leaf: &str| &t[&format!("{module}.{leaf}")];
    let (_, _, shape) = get("weight_shape");
    let shape: Vec<i64> = shape
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (n, k) = (shape[0] as usize, shape[1] as usize);
    let (pdt, pshape, packed) = get("weight_packed");
    assert_eq!(pdt, "I32");
    assert_eq!(pshape, &vec![n, (k * bits).div_ceil(32)], "{module}");
    let packed = words(packed);
    let (sdt, sshape, scales) = get("weight_scale");
    assert_eq!(sdt, "F16");
    let groups = sshape[1];
    assert_eq!(sshape[0], n);
    let scales: Vec<f32> = scales
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    let group_size = match w["strategy"].as_str().unwrap() {
        "group" => w["group_size"].as_u64().unwrap() as usize,
        "channel" => k,
        other => panic!("strategy {other}"),
    };
    assert_eq!(groups, k / group_size);
    let zp = |r: usize, g: usize| -> i32 {
        if w["symmetric"].as_bool().unwrap() {
            assert!(!t.contains_key(&format!("{module}.weight_zero_point")));
            return 0;
        }
        let (zdt, zshape, z) = get("weight_zero_point");
        assert_eq!(zdt, "I32");
        assert_eq!(zshape, &vec![(n * bits).div_ceil(32), groups]);
        let z = words(z);
        // packed along dim 0: column g is a stream over the rows
        let column: Vec<u32> = (0..zshape[0]).map(|i| z[i * groups + g]).collect();
        field(&column, bits, r) - offset
    };
    let row_words = pshape[1];
    let mut out = vec![0f32; n * k];
    for r in 0..n {
        let row = &packed[r * row_words..(r + 1) * row_words];
        for j in 0..k {
            let g = j / group_size;
            let q = field(row, bits, j) - offset;
            out[r * k + j] = (q - zp(r, g)) as f32 * scales[r * groups + g];
        }
    }
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Quantize `src` with `args`, export, and check the folder against the source model.
fn export_and_check(src: &Path, work: &Path, tag: &str, args: &[&str]) -> (PathBuf, PathBuf) {
    let q = work.join(format!("q-{tag}"));
    let mut quantize = vec!["quantize", s(src), "-o", s(&q), "--quiet"];
    quantize.extend_from_slice(args);
    succeeded(&bitsmith_offline(&quantize, work), "quantize");
    let (out, refw) = (
        work.join(format!("ct-{tag}")),
        work.join(format!("{tag}.st")),
    );
    let r = succeeded(
        &bitsmith_offline(
            &[
                "export",
                s(&q),
                "--format",
                "compressed-tensors",
                "-o",
                s(&out),
                "--reference-weights",
                s(&refw),
            ],
            work,
        ),
        "export",
    );
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors", "{tag}");
    assert_eq!(qc["format"], "pack-quantized");
    assert_eq!(qc["config_groups"]["group_0"]["format"], "pack-quantized");
    assert_eq!(qc["config_groups"]["group_0"]["weights"]["type"], "int");
    assert!(qc["ignore"]
        .as_array()
        .unwrap()
        .contains(&Value::from("lm_head")));
    assert!(out.join("tokenizer.json").is_file());

    let c = ModelConfig::from_file(&q.join("config.json")).unwrap();
    let gptq = GptqConfig::from_model_config(&c.raw).unwrap().unwrap();
    let store = WeightStore::open(&[q.join("model.safetensors")]).unwrap();
    let source = read_raw(&q.join("model.safetensors"));
    let written = read_raw(&out.join("model.safetensors"));
    let reference = read_raw(&refw);
    let mut linears = 0;
    for layer in 0..c.num_hidden_layers {
        for spec in block_linears(&c, layer) {
            let want = read_quantized_linear(&store, &spec, &gptq)
                .unwrap()
                .dequantize();
            let got = ct_dequantize(&written, &spec.name, qc);
            assert!(same_bits(&got, &want), "{tag} {}", spec.name);
            let (_, _, r) = &reference[&format!("{}.weight", spec.name)];
            let r: Vec<f32> = words(r).into_iter().map(f32::from_bits).collect();
            assert!(same_bits(&r, &want), "{tag} {}: reference", spec.name);
            linears += 1;
        }
    }
    assert_eq!(r["quantized_linears"], linears);
    // everything that is not a GPTQ tensor is copied as it is
    for (name, t) in &source {
        let leaf = name.rsplit('.').next().unwrap();
        if ["qweight", "qzeros", "scales", "g_idx"].contains(&leaf) {
            assert!(!written.contains_key(name), "{name} left behind");
        } else {
            assert_eq!(&written[name], t, "{tag} {name}");
        }
    }
    (out, refw)
}

/// w4 and w8, symmetric and asymmetric, group and channel strategies: the folder's
/// weights, read by the format's rules, are bitsmith's bit for bit.
#[test]
fn every_scheme_reads_back_as_bitsmith_s_weights() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth {
        tied: false,
        ..Synth::default()
    };
    syn.write(&src, 3, false);
    write_tokenizer(&src, syn.vocab);
    for (tag, args) in schemes() {
        let (out, _) = export_and_check(&src, work.path(), tag, args);
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let w = &cfg["quantization_config"]["config_groups"]["group_0"]["weights"];
        let sym = args.contains(&"--sym");
        assert_eq!(w["symmetric"], sym, "{tag}");
        let channel = args.contains(&"-1");
        assert_eq!(w["strategy"], if channel { "channel" } else { "group" });
    }
}

fn schemes() -> [(&'static str, &'static [&'static str]); 7] {
    [
        ("w2g32", &["--bits", "2", "--group-size", "32"]),
        ("w3g32sym", &["--bits", "3", "--group-size", "32", "--sym"]),
        ("w4g32sym", &["--bits", "4", "--group-size", "32", "--sym"]),
        ("w4g32", &["--bits", "4", "--group-size", "32"]),
        ("w4ch", &["--bits", "4", "--group-size", "-1"]),
        ("w8g32", &["--bits", "8", "--group-size", "32"]),
        ("w8chsym", &["--bits", "8", "--group-size", "-1", "--sym"]),
    ]
}

/// A group size that does not divide a layer's width, and act-order groups, have no
/// `pack-quantized` form: refused with the layer's name, and nothing is written.
#[test]
fn partial_groups_and_act_order_are_refused_by_layer() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth::default();
    syn.write(&src, 4, false);
    write_tokenizer(&src, syn.vocab);
    let export = |q: &Path, out: &Path| {
        bitsmith_offline(
            &[
                "export",
                s(q),
                "--format",
                "compressed-tensors",
                "-o",
                s(out),
            ],
            work.path(),
        )
    };
    // intermediate 96 is not a whole number of 64-column groups
    let g64 = work.path().join("g64");
    let o = bitsmith_offline(
        &[
            "quantize",
            s(&src),
            "--group-size",
            "64",
            "-o",
            s(&g64),
            "--quiet",
        ],
        work.path(),
    );
    succeeded(&o, "quantize");
    // said at quantize time already, once
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        stderr
            .matches("warning: --group-size 64 does not divide the input width of 2 of 14")
            .count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("every width: 16, 32, -1 (per channel)"),
        "{stderr}"
    );
    let out = work.path().join("ct-g64");
    let e = failed(&export(&g64, &out), "export g64");
    assert!(
        e.contains("`model.layers.0.mlp.down_proj` has 96 input columns"),
        "{e}"
    );
    assert!(!out.exists());

    let calib = work.path().join("calib.txt");
    std::fs::write(&calib, synthetic_text(syn.vocab, 4000, 2)).unwrap();
    let act = work.path().join("act");
    succeeded(
        &bitsmith_offline(
            &[
                "quantize",
                s(&src),
                "--method",
                "gptq",
                "--act-order",
                "--group-size",
                "32",
                "--calib",
                s(&calib),
                "--nsamples",
                "16",
                "--seqlen",
                "64",
                "-o",
                s(&act),
                "--quiet",
            ],
            work.path(),
        ),
        "quantize act-order",
    );
    let out = work.path().join("ct-act");
    let e = failed(&export(&act, &out), "export act-order");
    assert!(e.contains("is act-order quantized"), "{e}");
    assert!(e.contains("`model.layers.0."), "{e}");
    assert!(!out.exists());

    // act-order with static groups keeps every group contiguous: it converts
    let fixed = work.path().join("act-static");
    succeeded(
        &bitsmith_offline(
            &[
                "quantize",
                s(&src),
                "--method",
                "gptq",
                "--act-order",
                "--static-groups",
                "--group-size",
                "32",
                "--calib",
                s(&calib),
                "--nsamples",
                "16",
                "--seqlen",
                "64",
                "-o",
                s(&fixed),
                "--quiet",
            ],
            work.path(),
        ),
        "quantize act-order static groups",
    );
    succeeded(
        &export(&fixed, &work.path().join("ct-static")),
        "export static groups",
    );
}

/// A Python with compressed-tensors: `BITSMITH_CT_PYTHON` or `python3`; `Err(reason)` when
/// none can import it.
fn ct_python() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = vec![];
    if let Some(p) = std::env::var_os("BITSMITH_CT_PYTHON") {
        candidates.push(p.into());
    }
    candidates.push("python3".into());
    for p in &candidates {
        let o = Command::new(p)
            .args(["-c", "import compressed_tensors, torch, safetensors"])
            .output();
        if matches!(o, Ok(ref o) if o.status.success()) {
            return Ok(p.clone());
        }
    }
    Err(format!(
        "no Python with the `compressed-tensors` package among {candidates:?} (pip install \
         compressed-tensors, or set BITSMITH_CT_PYTHON)"
    ))
}

/// The compressed-tensors package's own decompression of every scheme's folder equals
/// bitsmith's weights (f32 bit for bit; in f16, bitsmith's weights rounded to f16).
#[test]
fn compressed_tensors_package_decompresses_as_bitsmith_does() {
    let python = match ct_python() {
        Ok(p) => p,
        Err(why) => {
            println!("skipping the compressed-tensors package check: {why}");
            return;
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/compressed_tensors_check.py");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let syn = Synth::default();
    syn.write(&src, 6, false);
    write_tokenizer(&src, syn.vocab);
    for (tag, args) in schemes() {
        let (out, refw) = export_and_check(&src, work.path(), tag, args);
        let o = Command::new(&python)
            .arg(&script)
            .arg(&out)
            .arg(&refw)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "compressed_tensors_check.py on {tag}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
