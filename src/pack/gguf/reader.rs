//! The GGUF header (metadata and tensor infos) read by bitsmith itself, whatever the tensor
//! types: candle's reader refuses a whole file as soon as one tensor has a type it does not
//! know (IQ4_NL among them). Tensors of the types candle decodes are still decoded by candle
//! (an implementation independent of this crate's encoders); the others by
//! [`dequantize_row`].

use super::{dequantize_row, GgmlType};
use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};

/// GGUF's default data alignment (`general.alignment` overrides it).
const DEFAULT_ALIGNMENT: u64 = 32;
/// Bounds that keep a corrupt header from asking for absurd allocations.
const MAX_COUNT: u64 = 1 << 24;
const MAX_STRING: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensorInfo {
    /// Row-major dimensions (GGUF stores them innermost first; reversed here, as candle does).
    pub dims: Vec<usize>,
    /// The `ggml_type` number.
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

/// A GGUF file's header.
#[derive(Debug)]
pub struct GgufHeader {
    pub metadata: HashMap<String, Value>,
    pub tensors: BTreeMap<String, RawTensorInfo>,
    /// Where the data section starts in the file.
    pub data_offset: u64,
    /// 1, 2 or 3.
    pub version: u32,
}

/// Read the header of the GGUF file `r` is positioned at the start of.
pub fn read_header<R: Read + Seek>(r: &mut R) -> Result<GgufHeader> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).context("reading the GGUF magic")?;
    ensure!(&magic == b"GGUF", "not a GGUF file (it does not start with `GGUF`)");
    let version = u32_le(r)?;
    ensure!(
        (1..=3).contains(&version),
        "GGUF version {version}; versions 1 to 3 are read"
    );
    let n_tensors = count(r, version)?;
    let n_kv = count(r, version)?;
    let mut metadata = HashMap::new();
    for i in 0..n_kv {
        let key = string(r, version).with_context(|| format!("metadata key {i}"))?;
        let ty = u32_le(r)?;
        let value = value(r, version, ty, 0).with_context(|| format!("metadata `{key}`"))?;
        metadata.insert(key, value);
    }
    let mut tensors = BTreeMap::new();
    for i in 0..n_tensors {
        let name = string(r, version).with_context(|| format!("tensor info {i}"))?;
        let n_dims = u32_le(r)?;
        ensure!(
            n_dims <= MAX_DIMS,
            "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
        );
        let mut dims = (0..n_dims)
            .map(|_| Ok(if version == 1 { u32_le(r)? as u64 } else { u64_le(r)? } as usize))
            .collect::<Result<Vec<usize>>>()?;
        dims.reverse();
        let type_id = u32_le(r)?;
        let offset = u64_le(r)?;
        tensors.insert(
            name,
            RawTensorInfo {
                dims,
                type_id,
                offset,
            },
        );
    }
    let alignment = match metadata.get("general.alignment") {
        Some(Value::U8(v)) => *v as u64,
        Some(Value::U16(v)) => *v as u64,
        Some(Value::U32(v)) => *v as u64,
        Some(Value::U64(v)) => *v,
        _ => DEFAULT_ALIGNMENT,
    };
    ensure!(alignment > 0, "general.alignment is 0");
    let position = r.stream_position()?;
    Ok(GgufHeader {
        metadata,
        tensors,
        data_offset: position.div_ceil(alignment) * alignment,
        version,
    })
}

impl GgufHeader {
    /// Decode tensor `name` to f32 (row-major, its `dims`): by candle where candle knows
    /// the type, by bitsmith's decoders otherwise.
    pub fn dequantize<R: Read + Seek>(&self, r: &mut R, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .with_context(|| format!("no tensor `{name}`"))?;
        let elems: usize = info.dims.iter().product();
        let dev = Device::Cpu;
        let read = |r: &mut R, bytes: usize| -> Result<Vec<u8>> {
            r.seek(SeekFrom::Start(self.data_offset + info.offset))?;
            let mut raw = vec![0u8; bytes];
            r.read_exact(&mut raw)
                .with_context(|| format!("reading {bytes} bytes of `{name}`"))?;
            Ok(raw)
        };
        if let Some(dtype) = candle_dtype(info.type_id) {
            ensure!(
                elems.is_multiple_of(dtype.block_size()),
                "`{name}`: {elems} values are not whole {dtype:?} blocks"
            );
            let raw = read(r, elems / dtype.block_size() * dtype.type_size())?;
            return Ok(qtensor_from_ggml(dtype, &raw, info.dims.clone(), &dev)?.dequantize(&dev)?);
        }
        let Some(ty) = GgmlType::from_id(info.type_id) else {
            bail!(
                "`{name}` has GGML type {}, which neither candle nor bitsmith decodes",
                info.type_id
            );
        };
        ensure!(
            elems.is_multiple_of(ty.block_size()),
            "`{name}`: {elems} values are not whole {ty} blocks"
        );
        let raw = read(r, elems / ty.block_size() * ty.type_size())?;
        let values = dequantize_row(ty, &raw).with_context(|| format!("decoding `{name}`"))?;
        Ok(Tensor::from_vec(values, info.dims.clone(), &dev)?)
    }
}

/// The candle type of `ggml_type` number `id`, for the types candle decodes (its own
/// `from_u32` is private; the numbers are ggml's `enum ggml_type`).
fn candle_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

fn u32_le<R: Read>(r: &mut R) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_le<R: Read>(r: &mut R) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A count or length: u32 in version 1, u64 after.
fn length<R: Read>(r: &mut R, version: u32) -> Result<u64> {
    Ok(if version == 1 { u32_le(r)? as u64 } else { u64_le(r)? })
}

fn count<R: Read>(r: &mut R, version: u32) -> Result<u64> {
    let n = length(r, version)?;
    ensure!(n <= MAX_COUNT, "a count of {n} in the header (corrupt file?)");
    Ok(n)
}

fn string<R: Read>(r: &mut R, version: u32) -> Result<String> {
    let n = length(r, version)?;
    ensure!(n <= MAX_STRING, "a string of {n} bytes in the header (corrupt file?)");
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b)?;
    // as candle reads them: some writers NUL-terminate, some vocabularies hold pieces that
    // are not valid UTF-8 (kept lossily)
    while b.last() == Some(&0) {
        b.pop();
    }
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// One metadata value of GGUF value type `ty` (arrays nest at most a few levels).
fn value<R: Read>(r: &mut R, version: u32, ty: u32, depth: usize) -> Result<Value> {
    let mut b = [0u8; 8];
    let mut take = |r: &mut R, n: usize| -> Result<[u8; 8]> {
        r.read_exact(&mut b[..n])?;
        Ok(b)
    };
    Ok(match ty {
        0 => Value::U8(take(r, 1)?[0]),
        1 => Value::I8(take(r, 1)?[0] as i8),
        2 => Value::U16(u16::from_le_bytes(take(r, 2)?[..2].try_into()?)),
        3 => Value::I16(i16::from_le_bytes(take(r, 2)?[..2].try_into()?)),
        4 => Value::U32(u32::from_le_bytes(take(r, 4)?[..4].try_into()?)),
        5 => Value::I32(i32::from_le_bytes(take(r, 4)?[..4].try_into()?)),
        6 => Value::F32(f32::from_le_bytes(take(r, 4)?[..4].try_into()?)),
        7 => Value::Bool(take(r, 1)?[0] != 0),
        8 => Value::String(string(r, version)?),
        9 => {
            ensure!(depth < 4, "metadata arrays nested deeper than 4");
            let elem = u32_le(r)?;
            let n = count(r, version)?;
            Value::Array(
                (0..n)
                    .map(|_| value(r, version, elem, depth + 1))
                    .collect::<Result<_>>()?,
            )
        }
        10 => Value::U64(u64::from_le_bytes(take(r, 8)?)),
        11 => Value::I64(i64::from_le_bytes(take(r, 8)?)),
        12 => Value::F64(f64::from_le_bytes(take(r, 8)?)),
        other => bail!("metadata value type {other} is not a GGUF type"),
    })
}
