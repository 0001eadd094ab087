//! Memory-mapped safetensors, single file or sharded, with shape/dtype checks that name
//! the file and tensor at fault.

use crate::error::{fail, tagged, ErrorKind, ResultExt};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A rewrite of some of a model's tensors (a transform's output, [`crate::quant`]),
/// computed when a tensor is read, so a rewritten model never has to be held whole.
pub trait TensorRewrite: Send + Sync {
    /// One line for logs and errors.
    fn describe(&self) -> String;
    /// Whether `name` is rewritten or added (cheap: no values computed).
    fn rewrites(&self, name: &str) -> bool;
    /// Tensors the rewrite adds to the model (e.g. an untied head).
    fn added(&self) -> &[String];
    /// The values of `name` after the rewrite, or `None` when it is left as stored;
    /// `base` is the model before the rewrite.
    fn rewrite(&self, name: &str, base: &WeightStore) -> Result<Option<Rewritten>>;
}

/// A tensor's values after a rewrite, and the dtype to store them in.
#[derive(Debug, Clone)]
pub struct Rewritten {
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
    pub dtype: SourceDType,
}

impl Rewritten {
    pub fn f32(values: Vec<f32>, shape: Vec<usize>) -> Self {
        Self {
            values,
            shape,
            dtype: SourceDType::F32,
        }
    }

    /// Values to be stored in `dtype` (F32, F16 or BF16), rounded to it now, so that what a
    /// reader of this store computes with is what a written model holds.
    pub fn stored_as(mut values: Vec<f32>, shape: Vec<usize>, dtype: SourceDType) -> Result<Self> {
        match dtype {
            SourceDType::F32 => {}
            SourceDType::F16 => values
                .par_iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            SourceDType::BF16 => values
                .par_iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            other => bail!("a rewritten tensor cannot be stored as {}", other.name()),
        }
        Ok(Self {
            values,
            shape,
            dtype,
        })
    }

    /// Little-endian bytes in `self.dtype` (F32, F16 or BF16).
    fn bytes(&self) -> Result<Vec<u8>> {
        Ok(match self.dtype {
            SourceDType::F32 => self.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            SourceDType::F16 => self
                .values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            SourceDType::BF16 => self
                .values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            other => bail!("a rewritten tensor cannot be stored as {}", other.name()),
        })
    }
}

/// The memory-mapped files of a store.
struct Mapped {
    files: Vec<(PathBuf, Mmap)>,
    /// Each file's `__metadata__` header entries.
    file_meta: Vec<HashMap<String, String>>,
    index: HashMap<String, TensorInfo>,
}

/// All tensors of a model, memory-mapped; nothing is copied until asked for. A store may
/// carry a [`TensorRewrite`] over another store ([`WeightStore::with_rewrite`]); reads
/// then see the rewritten model.
#[derive(Clone)]
pub struct WeightStore {
    mapped: Arc<Mapped>,
    rewrite: Option<(Arc<dyn TensorRewrite>, Box<WeightStore>)>,
}

impl WeightStore {
    /// This model seen through `rewrite` (which reads `self` as its base).
    pub fn with_rewrite(&self, rewrite: Arc<dyn TensorRewrite>) -> Self {
        Self {
            mapped: self.mapped.clone(),
            rewrite: Some((rewrite, Box::new(self.clone()))),
        }
    }

    /// What rewrites this store applies, outermost first.
    pub fn rewrites(&self) -> Vec<String> {
        let mut out = vec![];
        let mut s = self;
        while let Some((r, base)) = &s.rewrite {
            out.push(r.describe());
            s = base;
        }
        out
    }

    /// The rewritten values of `name`, if a rewrite of this store (or of its bases) has them.
    fn rewritten(&self, name: &str) -> Result<Option<Rewritten>> {
        match &self.rewrite {
            None => Ok(None),
            Some((r, base)) => match r.rewrite(name, base)? {
                Some(t) => Ok(Some(t)),
                None => base.rewritten(name),
            },
        }
    }

    fn is_rewritten(&self, name: &str) -> bool {
        match &self.rewrite {
            None => false,
            Some((r, base)) => r.rewrites(name) || base.is_rewritten(name),
        }
    }

    /// A tensor as stored in the model this store shows: dtype, shape and little-endian
    /// bytes (borrowed from the map unless a rewrite computed them).
    pub fn read_raw(&self, name: &str) -> Result<(SourceDType, Vec<usize>, Cow<'_, [u8]>)> {
        if let Some(t) = self.rewritten(name)? {
            let bytes = t.bytes()?;
            return Ok((t.dtype, t.shape, Cow::Owned(bytes)));
        }
        let (info, bytes) = self.raw(name)?;
        Ok((info.dtype, info.shape.clone(), Cow::Borrowed(bytes)))
    }

    /// Maps the safetensors files; an unreadable or malformed file is
    /// [`ErrorKind::InvalidModel`].
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        Self::map_files(paths).kind(ErrorKind::InvalidModel)
    }

    fn map_files(paths: &[PathBuf]) -> Result<Self> {
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
            mapped: Arc::new(Mapped {
                files,
                file_meta,
                index,
            }),
            rewrite: None,
        })
    }

    /// A `__metadata__` entry of the first file that has it.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.mapped
            .file_meta
            .iter()
            .find_map(|m| m.get(key))
            .map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.mapped.index.contains_key(name) || self.added().any(|n| n == name)
    }

    /// Tensors added by rewrites.
    fn added(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.rewrite {
            None => Box::new(std::iter::empty()),
            Some((r, base)) => Box::new(r.added().iter().map(|s| s.as_str()).chain(base.added())),
        }
    }

    /// Every tensor name of the model this store shows (rewrites' additions included).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.mapped
            .index
            .keys()
            .map(|s| s.as_str())
            .chain(self.added())
    }

    /// Where a tensor lives in the files (as stored, before any rewrite).
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.mapped
            .index
            .get(name)
            .ok_or_else(|| {
                tagged(
                    ErrorKind::InvalidModel,
                    format!("tensor `{name}` is missing from {}", self.describe_files()),
                )
            })
    }

    pub fn file_of(&self, name: &str) -> Result<&Path> {
        Ok(&self.mapped.files[self.info(name)?.file].0)
    }

    fn describe_files(&self) -> String {
        match self.mapped.files.as_slice() {
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

    /// The raw little-endian bytes of a tensor, borrowed from the map. A tensor a rewrite
    /// changes has no stored bytes: read it with [`Self::read_raw`] or [`Self::f32_vec`].
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        if self.is_rewritten(name) {
            bail!(
                "tensor `{name}` is rewritten ({}); it has no stored bytes",
                self.rewrites().join("; ")
            );
        }
        let info = self.info(name)?;
        Ok((info, &self.mapped.files[info.file].1[info.start..info.end]))
    }

    fn check_shape(&self, name: &str, info: &TensorInfo, shape: &[usize]) -> Result<()> {
        if info.shape != shape {
            fail!(
                InvalidModel,
                "tensor `{name}` in {} has shape {:?}, expected {:?}",
                self.mapped.files[info.file].0.display(),
                info.shape,
                shape
            );
        }
        Ok(())
    }

    /// A floating-point tensor converted to f32, checked against `shape` and for values
    /// that no trained weight holds (NaN, ±infinity): one such value turns every output
    /// into NaN, so it is an error naming the tensor, file and element.
    pub fn f32_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(t) = self.rewritten(name)? {
            if t.shape != shape {
                bail!(
                    "tensor `{name}` has shape {:?} after the rewrite ({}), expected {:?}",
                    t.shape,
                    self.rewrites().join("; "),
                    shape
                );
            }
            return Ok(t.values);
        }
        let (info, bytes) = self.raw(name)?;
        self.check_shape(name, info, shape)?;
        let path = &self.mapped.files[info.file].0;
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
            other => fail!(
                InvalidModel,
                "tensor `{name}` in {} has dtype {}, expected a float type (F32, F16 or BF16)",
                path.display(),
                other.name()
            ),
        };
        let out: Vec<f32> = out;
        if let Some(i) = out.par_iter().position_first(|v| !v.is_finite()) {
            fail!(
                InvalidModel,
                "tensor `{name}` in {} holds {} at element {i}: the file is corrupt (or was \
                 saved from a run that diverged)",
                path.display(),
                out[i]
            );
        }
        Ok(out)
    }

    /// An `I32` tensor (packed quantized data), checked against `shape`.
    pub fn i32_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        let (info, bytes) = self.raw(name)?;
        self.check_shape(name, info, shape)?;
        if info.dtype != SourceDType::I32 {
            fail!(
                InvalidModel,
                "tensor `{name}` in {} has dtype {}, expected I32",
                self.mapped.files[info.file].0.display(),
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
