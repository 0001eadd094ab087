//! Memory-mapped safetensors, single file or sharded, with shape/dtype checks that name
//! the file and tensor at fault.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Element types a weight may be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDType {
    F32,
    F16,
    BF16,
    I32,
    Other(Dtype),
}

impl SourceDType {
    fn from_st(d: Dtype) -> Self {
        match d {
            Dtype::F32 => Self::F32,
            Dtype::F16 => Self::F16,
            Dtype::BF16 => Self::BF16,
            Dtype::I32 => Self::I32,
            other => Self::Other(other),
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::BF16 => "BF16".into(),
            Self::I32 => "I32".into(),
            Self::Other(d) => format!("{d:?}"),
        }
    }

    pub fn st(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
            Self::I32 => Dtype::I32,
            Self::Other(d) => d,
        }
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub file: usize,
    pub dtype: SourceDType,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl TensorInfo {
    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

/// All tensors of a model, memory-mapped; nothing is copied until asked for.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    /// Each file's `__metadata__` header entries.
    file_meta: Vec<HashMap<String, String>>,
    index: HashMap<String, TensorInfo>,
}

impl WeightStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut file_meta = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the map is read-only; a file truncated underneath us is the user's
            // concurrent modification, the same contract every mmap-based loader has.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("memory-mapping {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow!(
                    "{} is not a valid safetensors file ({e}); it may be truncated or corrupt",
                    path.display()
                )
            })?;
            let data_start = 8 + header_len;
            file_meta.push(meta.metadata().clone().unwrap_or_default());
            for (name, info) in meta.tensors() {
                let entry = TensorInfo {
                    file: i,
                    dtype: SourceDType::from_st(info.dtype),
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                if index.insert(name.clone(), entry).is_some() {
                    bail!(
                        "tensor `{name}` appears in more than one shard (again in {})",
                        path.display()
                    );
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self {
            files,
            file_meta,
            index,
        })
    }

    /// A `__metadata__` entry of the first file that has it.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.file_meta
            .iter()
            .find_map(|m| m.get(key))
            .map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.index
            .get(name)
            .ok_or_else(|| anyhow!("tensor `{name}` is missing from {}", self.describe_files()))
    }

    pub fn file_of(&self, name: &str) -> Result<&Path> {
        Ok(&self.files[self.info(name)?.file].0)
    }

    fn describe_files(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            fs => format!(
                "the {} shards in {}",
                fs.len(),
                fs[0]
                    .0
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }

    /// The raw little-endian bytes of a tensor, borrowed from the map.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self.info(name)?;
        Ok((info, &self.files[info.file].1[info.start..info.end]))
    }

    fn check_shape(&self, name: &str, info: &TensorInfo, shape: &[usize]) -> Result<()> {
        if info.shape != shape {
            bail!(
                "tensor `{name}` in {} has shape {:?}, expected {:?}",
                self.files[info.file].0.display(),
                info.shape,
                shape
            );
        }
        Ok(())
    }

    /// A floating-point tensor converted to f32, checked against `shape`.
    pub fn f32_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (info, bytes) = self.raw(name)?;
        self.check_shape(name, info, shape)?;
        let path = &self.files[info.file].0;
        let out = match info.dtype {
            SourceDType::F32 => bytes
                .par_chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            SourceDType::BF16 => bytes
                .par_chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            SourceDType::F16 => bytes
                .par_chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => bail!(
                "tensor `{name}` in {} has dtype {}, expected a float type (F32, F16 or BF16)",
                path.display(),
                other.name()
            ),
        };
        Ok(out)
    }

    /// An `I32` tensor (packed quantized data), checked against `shape`.
    pub fn i32_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        let (info, bytes) = self.raw(name)?;
        self.check_shape(name, info, shape)?;
        if info.dtype != SourceDType::I32 {
            bail!(
                "tensor `{name}` in {} has dtype {}, expected I32",
                self.files[info.file].0.display(),
                info.dtype.name()
            );
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A float tensor as a candle tensor of `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let v = self.f32_vec(name, shape)?;
        let t = Tensor::from_vec(v, shape, device)?;
        Ok(if dtype == DType::F32 {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }
}
