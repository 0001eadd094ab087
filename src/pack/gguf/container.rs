//! The GGUF v3 container: header, metadata key/values, tensor infos, aligned tensor data.
//!
//! Layout (all little-endian): magic `GGUF`, version 3, tensor count (u64), metadata count
//! (u64); each metadata entry is a string key, a value-type u32 and the value (strings are a
//! u64 length and UTF-8 bytes; arrays an element type u32, a u64 count and the elements);
//! each tensor info is its name, its dimension count (u32), the dimensions (u64, innermost
//! first: a `[rows, cols]` matrix is stored as `[cols, rows]`), its `ggml_type` (u32) and its
//! data offset (u64) from the start of the data section. The data section starts at the
//! next multiple of the alignment (`general.alignment`, default 32), and every tensor's
//! offset is a multiple of it too.
//!
//! [`GgufWriter`] streams: the header is written from the tensor infos alone (a tensor's
//! size follows from its type and shape), then the tensors' bytes one at a time in the
//! declared order, so a whole model never has to be held in memory.

use super::blocks::GgmlType;
use anyhow::{bail, ensure, Context, Result};
use std::io::Write;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// The alignment a reader assumes without a `general.alignment` key.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// A metadata value (the GGUF value types, with arrays of any of them).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Elements all of `ty` (checked when written).
    Array(ValueType, Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// The GGUF value type numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl MetaValue {
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array(..) => ValueType::Array,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
        }
    }

    /// An array of strings.
    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Self {
        Self::Array(
            ValueType::String,
            items.into_iter().map(|s| Self::String(s.into())).collect(),
        )
    }

    /// An array of i32.
    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Self {
        Self::Array(ValueType::I32, items.into_iter().map(Self::I32).collect())
    }

    /// An array of f32.
    pub fn f32s(items: impl IntoIterator<Item = f32>) -> Self {
        Self::Array(ValueType::F32, items.into_iter().map(Self::F32).collect())
    }

    fn write(&self, w: &mut impl Write, key: &str) -> Result<()> {
        match self {
            Self::U8(v) => w.write_all(&[*v])?,
            Self::I8(v) => w.write_all(&v.to_le_bytes())?,
            Self::U16(v) => w.write_all(&v.to_le_bytes())?,
            Self::I16(v) => w.write_all(&v.to_le_bytes())?,
            Self::U32(v) => w.write_all(&v.to_le_bytes())?,
            Self::I32(v) => w.write_all(&v.to_le_bytes())?,
            Self::F32(v) => w.write_all(&v.to_le_bytes())?,
            Self::Bool(v) => w.write_all(&[*v as u8])?,
            Self::String(s) => write_string(w, s)?,
            Self::Array(ty, items) => {
                w.write_all(&(*ty as u32).to_le_bytes())?;
                w.write_all(&(items.len() as u64).to_le_bytes())?;
                for (i, item) in items.iter().enumerate() {
                    ensure!(
                        item.value_type() == *ty,
                        "metadata `{key}`: element {i} is {:?} in an array of {ty:?}",
                        item.value_type()
                    );
                    item.write(w, key)?;
                }
            }
            Self::U64(v) => w.write_all(&v.to_le_bytes())?,
            Self::I64(v) => w.write_all(&v.to_le_bytes())?,
            Self::F64(v) => w.write_all(&v.to_le_bytes())?,
        }
        Ok(())
    }
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// One tensor as declared in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape as in PyTorch/safetensors (`[rows, cols]`); written innermost first.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Bytes of the tensor's data; an error when its rows are not whole blocks.
    pub fn byte_len(&self) -> Result<usize> {
        let cols = *self.shape.last().unwrap_or(&1);
        let rows: usize = self.shape.iter().rev().skip(1).product();
        Ok(rows
            * self
                .ty
                .row_bytes(cols)
                .with_context(|| format!("tensor `{}` {:?}", self.name, self.shape))?)
    }
}

/// Writes a GGUF file: [`GgufWriter::begin`] the header, then [`GgufWriter::write_tensor`]
/// every declared tensor in order, then [`GgufWriter::finish`].
pub struct GgufWriter<W: Write> {
    w: W,
    tensors: Vec<(TensorInfo, usize)>,
    next: usize,
    alignment: usize,
    written: u64,
}

fn padding(pos: u64, alignment: usize) -> usize {
    (alignment - (pos % alignment as u64) as usize) % alignment
}

impl<W: Write> GgufWriter<W> {
    /// Write the header, the metadata and the tensor infos (offsets laid out here).
    pub fn begin(
        mut w: W,
        metadata: &[(String, MetaValue)],
        tensors: Vec<TensorInfo>,
    ) -> Result<Self> {
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, MetaValue::U32(a))) if *a > 0 && a.is_multiple_of(8) => *a as usize,
            Some((_, v)) => bail!("general.alignment must be a u32 multiple of 8, not {v:?}"),
        };
        let mut seen = std::collections::HashSet::new();
        for (k, _) in metadata {
            ensure!(seen.insert(k.as_str()), "metadata key `{k}` given twice");
        }
        let mut seen = std::collections::HashSet::new();
        let mut sized = Vec::with_capacity(tensors.len());
        for t in tensors {
            ensure!(
                seen.insert(t.name.clone()),
                "tensor `{}` declared twice",
                t.name
            );
            let n = t.byte_len()?;
            sized.push((t, n));
        }
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(sized.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            write_string(&mut head, k)?;
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            v.write(&mut head, k)?;
        }
        let mut offset = 0u64;
        for (t, n) in &sized {
            write_string(&mut head, &t.name)?;
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += *n as u64;
            offset += padding(offset, alignment) as u64;
        }
        let pad = padding(head.len() as u64, alignment);
        head.resize(head.len() + pad, 0);
        w.write_all(&head)?;
        Ok(Self {
            w,
            tensors: sized,
            next: 0,
            alignment,
            written: head.len() as u64,
        })
    }

    /// Write the data of the next declared tensor (`name` must be it).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some((t, n)) = self.tensors.get(self.next) else {
            bail!("tensor `{name}` written after all declared tensors");
        };
        ensure!(
            t.name == name,
            "tensor `{name}` written where `{}` was declared next",
            t.name
        );
        ensure!(
            data.len() == *n,
            "tensor `{name}` has {} bytes where {:?} {} needs {n}",
            data.len(),
            t.shape,
            t.ty
        );
        self.w.write_all(data)?;
        let pad = padding(data.len() as u64, self.alignment);
        self.w.write_all(&vec![0u8; pad])?;
        self.written += (data.len() + pad) as u64;
        self.next += 1;
        Ok(())
    }

    /// Check every declared tensor was written and flush; returns the writer and the bytes
    /// written.
    pub fn finish(mut self) -> Result<(W, u64)> {
        if let Some((t, _)) = self.tensors.get(self.next) {
            bail!("tensor `{}` was declared but never written", t.name);
        }
        self.w.flush()?;
        Ok((self.w, self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, Value};

    /// candle's reader (an independent implementation) reads back every value type,
    /// nested arrays, the tensor infos and the data at the aligned offsets.
    #[test]
    fn candle_reads_back_metadata_and_tensors() {
        let meta: Vec<(String, MetaValue)> = vec![
            ("a.u8".into(), MetaValue::U8(200)),
            ("a.i8".into(), MetaValue::I8(-5)),
            ("a.u16".into(), MetaValue::U16(60000)),
            ("a.i16".into(), MetaValue::I16(-30000)),
            ("a.u32".into(), MetaValue::U32(4_000_000_000)),
            ("a.i32".into(), MetaValue::I32(-2_000_000_000)),
            ("a.f32".into(), MetaValue::F32(1.5)),
            ("a.bool".into(), MetaValue::Bool(true)),
            ("a.str".into(), MetaValue::String("héllo".into())),
            ("a.u64".into(), MetaValue::U64(1 << 40)),
            ("a.i64".into(), MetaValue::I64(-(1 << 40))),
            ("a.f64".into(), MetaValue::F64(0.1)),
            ("a.strs".into(), MetaValue::strings(["x", "", "yz"])),
            ("a.ints".into(), MetaValue::i32s([1, -2, 3])),
            (
                "a.nested".into(),
                MetaValue::Array(
                    ValueType::Array,
                    vec![MetaValue::i32s([7]), MetaValue::i32s([])],
                ),
            ),
            ("general.alignment".into(), MetaValue::U32(64)),
        ];
        let tensors = vec![
            TensorInfo {
                name: "t.f32".into(),
                shape: vec![3],
                ty: GgmlType::F32,
            },
            TensorInfo {
                name: "t.q8".into(),
                shape: vec![2, 32],
                ty: GgmlType::Q8_0,
            },
        ];
        let mut w = GgufWriter::begin(Vec::new(), &meta, tensors).unwrap();
        let f = [1f32, 2.0, 3.0];
        w.write_tensor(
            "t.f32",
            &f.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
        )
        .unwrap();
        let x: Vec<f32> = (0..64).map(|i| i as f32 - 30.0).collect();
        let mut q = vec![];
        super::super::blocks::quantize_row(GgmlType::Q8_0, &x, &mut q).unwrap();
        w.write_tensor("t.q8", &q).unwrap();
        let (bytes, n) = w.finish().unwrap();
        assert_eq!(n as usize, bytes.len());
        let mut cur = std::io::Cursor::new(&bytes);
        let c = Content::read(&mut cur).unwrap();
        let m = &c.metadata;
        assert!(matches!(m["a.u8"], Value::U8(200)));
        assert!(matches!(m["a.i8"], Value::I8(-5)));
        assert!(matches!(m["a.u16"], Value::U16(60000)));
        assert!(matches!(m["a.i16"], Value::I16(-30000)));
        assert!(matches!(m["a.u32"], Value::U32(4_000_000_000)));
        assert!(matches!(m["a.i32"], Value::I32(-2_000_000_000)));
        assert!(matches!(m["a.f32"], Value::F32(v) if v == 1.5));
        assert!(matches!(m["a.bool"], Value::Bool(true)));
        assert_eq!(m["a.str"].to_string().unwrap(), "héllo");
        assert!(matches!(m["a.u64"], Value::U64(v) if v == 1 << 40));
        assert!(matches!(m["a.i64"], Value::I64(v) if v == -(1 << 40)));
        assert!(matches!(m["a.f64"], Value::F64(v) if v == 0.1));
        let strs: Vec<String> = m["a.strs"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_string().unwrap().clone())
            .collect();
        assert_eq!(strs, ["x", "", "yz"]);
        let ints: Vec<i32> = m["a.ints"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_i32().unwrap())
            .collect();
        assert_eq!(ints, [1, -2, 3]);
        assert_eq!(
            m["a.nested"].to_vec().unwrap()[0].to_vec().unwrap()[0]
                .to_i32()
                .unwrap(),
            7
        );
        let t = &c.tensor_infos["t.q8"];
        assert_eq!(t.shape.dims(), &[2, 32]);
        assert_eq!(c.tensor_infos["t.f32"].offset, 0);
        assert_eq!(t.offset, 64);
        assert!((c.tensor_data_offset as usize).is_multiple_of(64));
        let qt = c
            .tensor(&mut cur, "t.q8", &candle_core::Device::Cpu)
            .unwrap();
        let back: Vec<f32> = qt
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            back,
            super::super::blocks::dequantize_row(GgmlType::Q8_0, &q).unwrap()
        );
        let ft = c
            .tensor(&mut cur, "t.f32", &candle_core::Device::Cpu)
            .unwrap();
        let back: Vec<f32> = ft
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn misuse_is_an_error() {
        let t = |name: &str| TensorInfo {
            name: name.into(),
            shape: vec![32],
            ty: GgmlType::Q4_0,
        };
        assert!(GgufWriter::begin(Vec::new(), &[], vec![t("a"), t("a")]).is_err());
        let bad = TensorInfo {
            name: "b".into(),
            shape: vec![33],
            ty: GgmlType::Q4_0,
        };
        assert!(GgufWriter::begin(Vec::new(), &[], vec![bad]).is_err());
        let mut w = GgufWriter::begin(Vec::new(), &[], vec![t("a"), t("b")]).unwrap();
        assert!(w.write_tensor("b", &[0; 18]).is_err());
        assert!(w.write_tensor("a", &[0; 17]).is_err());
        w.write_tensor("a", &[0; 18]).unwrap();
        assert!(w.finish().is_err());
        let mixed = MetaValue::Array(ValueType::I32, vec![MetaValue::I32(1), MetaValue::U8(2)]);
        assert!(GgufWriter::begin(Vec::new(), &[("k".into(), mixed)], vec![]).is_err());
    }
}
