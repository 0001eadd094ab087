//! `bitsmith inspect FILE.gguf`: what the file holds as written (its metadata, the GGML
//! type of every tensor and the bits they take), read from the header without decoding.

use super::human_bytes;
use crate::pack::gguf::reader::{read_header, GgufHeader};
use crate::pack::gguf::GgmlType;
use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The report for the GGUF file at `path`; `summary` hides the per-tensor table.
pub fn report(path: &Path, summary: bool, out: &mut String) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let h = read_header(&mut f).with_context(|| format!("reading {} as GGUF", path.display()))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    writeln!(out, "model          {} (GGUF v{})", path.display(), h.version)?;
    let arch = text(&h, "general.architecture").unwrap_or_else(|| "?".into());
    writeln!(
        out,
        "architecture   {arch}{}",
        text(&h, "general.name")
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    )?;
    let n = |key: &str| number(&h, &format!("{arch}.{key}")).map_or("?".into(), |v| v.to_string());
    writeln!(
        out,
        "shape          {} layers, hidden {}, intermediate {}, heads {} (kv {}), context {}",
        n("block_count"),
        n("embedding_length"),
        n("feed_forward_length"),
        n("attention.head_count"),
        n("attention.head_count_kv"),
        n("context_length")
    )?;
    if let Some(ft) = number(&h, "general.file_type") {
        writeln!(out, "file type      {ft} (llama.cpp's LLAMA_FTYPE number)")?;
    }
    // per type: tensors, weights, bytes
    let mut by_type: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let mut rows = Vec::with_capacity(h.tensors.len());
    for (name, t) in &h.tensors {
        let weights: usize = t.dims.iter().product();
        let (type_name, bytes) = match GgmlType::from_id(t.type_id) {
            Some(ty) => {
                let cols = t.dims.last().copied().unwrap_or(1);
                let row = ty.row_bytes(cols).with_context(|| format!("tensor `{name}`"))?;
                (ty.name().to_string(), row * (weights / cols.max(1)))
            }
            None => (format!("type {}", t.type_id), 0),
        };
        let e = by_type.entry(type_name.clone()).or_default();
        *e = (e.0 + 1, e.1 + weights, e.2 + bytes);
        rows.push((name, type_name, &t.dims));
    }
    let (weights, bytes) = by_type
        .values()
        .fold((0, 0), |(w, b), v| (w + v.1, b + v.2));
    writeln!(
        out,
        "tensors        {} tensors, {weights} weights, {} of tensor data ({:.3} bits per weight), file {}",
        h.tensors.len(),
        human_bytes(bytes as u64),
        bytes as f64 * 8.0 / weights.max(1) as f64,
        human_bytes(size)
    )?;
    for (ty, (count, w, b)) in &by_type {
        let bits = if *b > 0 {
            format!("{:.3} bits per weight", *b as f64 * 8.0 / (*w).max(1) as f64)
        } else {
            "a type bitsmith does not size".to_string()
        };
        writeln!(out, "  {ty:<8} ×{count:<4} {w} weights, {bits}")?;
    }
    if !summary {
        writeln!(out, "\n{:<40} {:>8}  shape", "tensor", "type")?;
        for (name, ty, dims) in rows {
            writeln!(out, "{name:<40} {ty:>8}  {dims:?}")?;
        }
    }
    Ok(())
}

fn text(h: &GgufHeader, key: &str) -> Option<String> {
    h.metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
}

fn number(h: &GgufHeader, key: &str) -> Option<u64> {
    match h.metadata.get(key)? {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}
