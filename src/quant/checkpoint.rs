//! Per-block checkpoints of a calibrated quantization run, so an interrupted run resumes
//! from its last finished block with the same result. A checkpoint folder holds `key.json`
//! (everything that determines the result: model, revision, calibration, options), one
//! `block-NNNNN.safetensors` per finished block (codes, scales, zeros, `g_idx`, column
//! losses; its layers' log lines in the metadata), `inputs-NNNNN.safetensors` (the next
//! block's inputs) and `index.json` (each of those files' size and FNV-1a hash). Every file
//! is written to a temporary name and renamed (and the folder fsynced), and the index is
//! written last, so a crash or power loss leaves the previous state intact; on resume each
//! file is checked against the index and a damaged one is recomputed. Block files and the
//! index are fsynced before they count; the activations file is not (0.6 GB per block at
//! 128 × 2048 on the fixture, ~4 s of fsync each here): if a power cut loses it, its hash no
//! longer matches and resume recomputes it from the fsynced block files.
//! [`SaveInBackground`] writes a block's checkpoint while the next block computes.

use crate::loader::WeightStore;
use crate::model::spec::BLOCK_LINEARS;
use crate::model::LinearSpec;
use crate::quant::grid::GgmlType;
use crate::quant::{
    CodebookQuantizedLinear, GgmlQuantizedLinear, GroupSize, LayerCodes, LayerResult,
    MixedCodebookQuantizedLinear, MixedQuantizedLinear, QuantizedLinear, UniformGrid, WidthCodebook,
};
use crate::quant::transform::ostquant::{KEY_FILE, STATE_FILE};
use crate::util::{f16_bytes, u32_bytes, OutTensor};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Storage, Tensor};
use std::borrow::Cow;
use half::f16;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Files other stages keep in the checkpoint folder, which the block looper leaves alone.
const OTHER_STAGES: [&str; 2] = [STATE_FILE, KEY_FILE];

#[derive(Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    key: Value,
}

/// One restored layer's line of the run log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerEntry {
    pub name: String,
    pub loss: Option<f64>,
    pub seconds: f64,
}

/// State restored from a checkpoint.
pub struct Resume {
    /// Layers of blocks `0..next_block`, in execution order.
    pub layers: Vec<(String, LayerResult)>,
    /// Their log lines (loss and seconds of the run that computed them).
    pub log: Vec<LayerEntry>,
    /// The inputs of block `next_block`; `None` when they were lost with a damaged file and
    /// must be recomputed by running blocks `0..next_block` again with the restored codes.
    pub inputs: Option<Vec<Tensor>>,
    pub next_block: usize,
}

/// `index.json`: the commit point of a checkpoint. A block or activations file counts only
/// once the index naming it (with its hash) is written, so a kill between two writes leaves
/// the previous, consistent state.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    blocks: Vec<FileEntry>,
    /// The inputs of block `blocks.len()`.
    activations: Option<FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    file: String,
    bytes: u64,
    fnv1a: String,
}

/// FNV-1a (64-bit) of a file's bytes: cheap, and enough to catch a truncated or damaged
/// file (this guards against accidents, not tampering).
pub fn fnv1a_bytes(data: &[u8]) -> String {
    format!("{:016x}", fnv1a_update(FNV1A_START, data))
}

const FNV1A_START: u64 = 0xcbf29ce484222325;

fn fnv1a_update(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Size and FNV-1a of a file, read in chunks: an activations file is as large as all the
/// calibration activations (0.6 GB at 128 × 2048 on the fixture), and reading it whole
/// would add that much to the run's peak memory.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut h, mut bytes) = (FNV1A_START, 0u64);
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h = fnv1a_update(h, &buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, format!("{h:016x}")))
}

fn entry_for(path: &Path) -> Result<FileEntry> {
    let (bytes, fnv1a) = hash_file(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(FileEntry {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes,
        fnv1a,
    })
}

/// Whether the file an entry names is there with the recorded size and hash.
fn entry_ok(dir: &Path, e: &FileEntry) -> bool {
    let path = dir.join(&e.file);
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == e.bytes => {}
        _ => return false,
    }
    hash_file(&path).is_ok_and(|(bytes, h)| bytes == e.bytes && h == e.fnv1a)
}

/// Write `bytes` via `write` to a temporary file, fsync it, rename it over `path` and
/// fsync the folder, so after a crash `path` holds either the old or the new content.
fn write_durable(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_renamed(path, Fsync::Data, write)
}

/// Whether a checkpoint file's bytes are fsynced before it is renamed into place.
#[derive(Clone, Copy, PartialEq)]
enum Fsync {
    Data,
    /// Only the rename: for files whose loss the index's hash detects and resume repairs.
    NameOnly,
}

fn write_renamed(path: &Path, sync: Fsync, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    if sync == Fsync::Data {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing folder {}", dir.display()))?;
    let _ = dir;
    Ok(())
}

fn write_atomic(
    path: &Path,
    sync: Fsync,
    tensors: &BTreeMap<String, OutTensor>,
    meta: HashMap<String, String>,
) -> Result<()> {
    write_renamed(path, sync, |tmp| {
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(meta),
            tmp,
        )
        .map_err(|e| anyhow!("writing checkpoint {}: {e}", tmp.display()))
    })
}

/// The differences between two JSON values, as `path: old → new` lines.
pub fn json_diff(old: &Value, new: &Value) -> Vec<String> {
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        &p,
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        out,
                    );
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    walk(&format!("{path}[{i}]"), u, v, out);
                }
            }
            _ if a != b => out.push(format!(
                "{}: {a} → {b}",
                if path.is_empty() { "key" } else { path }
            )),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

impl Checkpoint {
    pub fn new(dir: PathBuf, key: Value) -> Self {
        Self { dir, key }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn block_path(&self, block: usize) -> PathBuf {
        self.dir.join(format!("block-{block:05}.safetensors"))
    }

    /// Remove the checkpoint (start over).
    pub fn discard(&self) -> Result<()> {
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing the checkpoint {}", self.dir.display()))?;
        }
        Ok(())
    }

    /// Remove this looper's files and keep the ones a stage before it left in the same
    /// folder (OSTQuant's training state: the run trained it moments ago, and `quantize`
    /// copies it to the output folder at the end).
    fn discard_blocks(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if OTHER_STAGES.contains(&name.as_str()) {
                continue;
            }
            let path = e.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    fn read_index(&self) -> Index {
        std::fs::read_to_string(self.dir.join("index.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let text = serde_json::to_string_pretty(index)?;
        write_durable(&self.dir.join("index.json"), |tmp| {
            std::fs::write(tmp, &text).with_context(|| format!("writing {}", tmp.display()))
        })
    }

    /// The checkpoint written with this key, or `None` when there is none. A checkpoint made
    /// with another key (another model, calibration or option) is an error naming what
    /// differs. Damaged files are dropped with a message on stderr: the blocks from the
    /// first damaged one on are recomputed.
    pub fn load(&self, grid: UniformGrid, device: &Device) -> Result<Option<Resume>> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        self.remove_leftovers();
        let key_path = self.dir.join("key.json");
        let stored: Option<Value> = std::fs::read_to_string(&key_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let Some(stored) = stored else {
            eprintln!(
                "checkpoint {} has no readable key.json; discarding its blocks and starting from block 0",
                self.dir.display()
            );
            self.discard_blocks()?;
            return Ok(None);
        };
        if stored != self.key {
            let diff = json_diff(&stored, &self.key);
            bail!(
                "the checkpoint {} was made by a run with different settings:\n  {}\n\
                 resuming would mix the two runs' results. Run the original command to resume it, \
                 or pass --fresh (or --overwrite) to discard it and start over",
                self.dir.display(),
                diff.join("\n  ")
            );
        }
        let index = self.read_index();
        // the longest run of intact blocks
        let good = index
            .blocks
            .iter()
            .position(|e| !entry_ok(&self.dir, e))
            .unwrap_or(index.blocks.len());
        let acts_ok = good == index.blocks.len()
            && index
                .activations
                .as_ref()
                .is_some_and(|e| entry_ok(&self.dir, e));
        if good < index.blocks.len() {
            eprintln!(
                "checkpoint {}: {} is damaged or incomplete; dropping it and the blocks after it, \
                 recomputing from block {good}",
                self.dir.display(),
                index.blocks[good].file
            );
        } else if good > 0 && !acts_ok {
            eprintln!(
                "checkpoint {}: the saved activations are damaged or missing; recomputing them \
                 from the {good} checkpointed blocks",
                self.dir.display()
            );
        }
        let mut layers = Vec::new();
        let mut log = Vec::new();
        for block in 0..good {
            let store = WeightStore::open(&[self.block_path(block)])?;
            let mut stems: Vec<String> = store
                .names()
                .filter_map(|n| {
                    n.strip_suffix(".codes")
                        .or_else(|| n.strip_suffix(".ggml"))
                        .map(str::to_string)
                })
                .collect();
            // restore in execution order (q, k, v, o, gate, up, down)
            stems.sort_by_key(|s| BLOCK_LINEARS.iter().position(|suffix| s.ends_with(suffix)));
            for stem in stems {
                layers.push((stem.clone(), read_layer(&store, &stem, grid)?));
            }
            let entries: Vec<LayerEntry> = store
                .metadata("log")
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default();
            log.extend(entries);
        }
        let inputs = if acts_ok {
            let act_path = self
                .dir
                .join(&index.activations.as_ref().expect("checked").file);
            let acts = WeightStore::open(std::slice::from_ref(&act_path))?;
            let mut names: Vec<&str> = acts.names().collect();
            names.sort_by_key(|n| {
                n.trim_start_matches("x.")
                    .parse::<usize>()
                    .unwrap_or(usize::MAX)
            });
            Some(
                names
                    .iter()
                    .map(|n| {
                        let shape = acts.info(n)?.shape.clone();
                        Ok(Tensor::from_vec(acts.f32_vec(n, &shape)?, shape, device)?)
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        if good < index.blocks.len() || (!acts_ok && index.activations.is_some()) {
            // forget what was dropped, so the index never names a damaged file again
            let kept = Index {
                blocks: index.blocks[..good].to_vec(),
                activations: if acts_ok { index.activations } else { None },
            };
            self.write_index(&kept)?;
            self.remove_leftovers();
        }
        if good == 0 {
            return Ok(None);
        }
        Ok(Some(Resume {
            layers,
            log,
            inputs,
            next_block: good,
        }))
    }

    /// Remove files no index names: temporary files of an interrupted write, and block or
    /// activations files written after the last index.
    fn remove_leftovers(&self) {
        let index = self.read_index();
        let named: std::collections::HashSet<String> = index
            .blocks
            .iter()
            .chain(&index.activations)
            .map(|e| e.file.clone())
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stray = name.ends_with(".tmp")
                || (name.ends_with(".safetensors")
                    && !named.contains(&name)
                    && !OTHER_STAGES.contains(&name.as_str()));
            if stray {
                std::fs::remove_file(e.path()).ok();
            }
        }
    }

    /// Record a finished block (with its layers' log lines) and the inputs of the next one.
    pub fn save_block(
        &self,
        block: usize,
        layers: &[(LinearSpec, LayerResult)],
        log: &[LayerEntry],
        next_inputs: &[Tensor],
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        if !self.dir.join("key.json").is_file() {
            let text = serde_json::to_string_pretty(&self.key)?;
            write_durable(&self.dir.join("key.json"), |tmp| {
                std::fs::write(tmp, &text).with_context(|| format!("writing {}", tmp.display()))
            })?;
        }
        let mut t = BTreeMap::new();
        let (no_codes, no_scales): (Vec<u8>, Vec<f16>) = (vec![], vec![]);
        for (spec, r) in layers {
            let n = &spec.name;
            let mut put = |leaf: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| {
                t.insert(
                    format!("{n}.{leaf}"),
                    OutTensor {
                        dtype,
                        shape,
                        data: data.into(),
                    },
                );
            };
            if let LayerCodes::Ggml(q) = &r.codes {
                // the GGUF tensor's bytes, one row of blocks per output row, and the type
                let row = q.data.len() / q.out_features.max(1);
                put("ggml", Dtype::U8, vec![q.out_features, row], q.data.clone());
                let id = q.ty.id().to_le_bytes().to_vec();
                put("ggml_type", Dtype::U32, vec![1], id);
            }
            // every other kind stores codes `[out, in]` and scales `[groups, out]` (and
            // the integer grids zeros `[groups, out]`)
            let (rows, cols, codes, scales, zeros) = match &r.codes {
                LayerCodes::Ggml(_) => (0, 0, &no_codes, &no_scales, None),
                LayerCodes::Uniform(q) => (
                    q.out_features,
                    q.in_features,
                    &q.codes,
                    &q.scales,
                    Some(&q.zeros),
                ),
                LayerCodes::Mixed(q) => (
                    q.out_features,
                    q.in_features,
                    &q.codes,
                    &q.scales,
                    Some(&q.zeros),
                ),
                LayerCodes::Codebook(q) => {
                    (q.out_features, q.in_features, &q.codes, &q.scales, None)
                }
                LayerCodes::MixedCodebook(q) => {
                    (q.out_features, q.in_features, &q.codes, &q.scales, None)
                }
            };
            let groups = scales.len() / rows.max(1);
            if !matches!(r.codes, LayerCodes::Ggml(_)) {
                put("codes", Dtype::U8, vec![rows, cols], codes.clone());
                put("scales", Dtype::F16, vec![groups, rows], f16_bytes(scales));
            }
            if let Some(zeros) = zeros {
                put("zeros", Dtype::U8, vec![groups, rows], zeros.clone());
            }
            match &r.codes {
                LayerCodes::Ggml(_) => {}
                LayerCodes::Codebook(q) => {
                    put(
                        "g_idx",
                        Dtype::U32,
                        vec![q.in_features],
                        u32_bytes(&q.g_idx),
                    );
                    let table: Vec<u8> = q.table.iter().flat_map(|x| x.to_le_bytes()).collect();
                    put("table", Dtype::F32, vec![q.table.len()], table);
                    put(
                        "exponent",
                        Dtype::F32,
                        vec![1],
                        q.exponent.to_le_bytes().to_vec(),
                    );
                    // 0 = per channel
                    let g = q.group_size.as_columns().unwrap_or(0) as u32;
                    put(
                        "codebook_group_size",
                        Dtype::U32,
                        vec![1],
                        g.to_le_bytes().to_vec(),
                    );
                }
                LayerCodes::Uniform(q) => {
                    put(
                        "g_idx",
                        Dtype::U32,
                        vec![q.in_features],
                        u32_bytes(&q.g_idx),
                    );
                }
                LayerCodes::MixedCodebook(q) => {
                    put("widths", Dtype::U8, vec![q.in_features], q.widths.clone());
                    let g = q.group_size.unwrap_or(0) as u32;
                    put(
                        "mixed_group_size",
                        Dtype::U32,
                        vec![1],
                        g.to_le_bytes().to_vec(),
                    );
                    // the tables of every width present, concatenated in ascending width
                    let bits: Vec<u8> = q.tables.iter().map(|t| t.bits).collect();
                    let exps: Vec<u8> =
                        q.tables.iter().flat_map(|t| t.exponent.to_le_bytes()).collect();
                    let tables: Vec<u8> = q
                        .tables
                        .iter()
                        .flat_map(|t| t.table.iter().flat_map(|x| x.to_le_bytes()))
                        .collect();
                    put("width_bits", Dtype::U8, vec![bits.len()], bits);
                    put("width_exponents", Dtype::F32, vec![q.tables.len()], exps);
                    put("width_tables", Dtype::F32, vec![tables.len() / 4], tables);
                }
                LayerCodes::Mixed(q) => {
                    put("widths", Dtype::U8, vec![q.in_features], q.widths.clone());
                    put("sym", Dtype::U8, vec![1], vec![q.sym as u8]);
                    // 0 = one range per row and width
                    let g = q.group_size.unwrap_or(0) as u32;
                    put(
                        "mixed_group_size",
                        Dtype::U32,
                        vec![1],
                        g.to_le_bytes().to_vec(),
                    );
                }
            }
            if let Some(l) = &r.column_loss {
                let bytes: Vec<u8> = l.iter().flat_map(|x| x.to_le_bytes()).collect();
                t.insert(
                    format!("{n}.column_loss"),
                    OutTensor {
                        dtype: Dtype::F64,
                        shape: vec![l.len()],
                        data: bytes.into(),
                    },
                );
            }
        }
        let meta = HashMap::from([("log".to_string(), serde_json::to_string(log)?)]);
        write_atomic(&self.block_path(block), Fsync::Data, &t, meta)?;
        // borrow every segment's f32 data instead of copying ~all activations once more
        let contiguous: Vec<Tensor> = next_inputs
            .iter()
            .map(|x| x.contiguous())
            .collect::<candle_core::Result<_>>()?;
        let guards: Vec<_> = contiguous.iter().map(|x| x.storage_and_layout()).collect();
        let mut acts = BTreeMap::new();
        for (i, ((storage, layout), x)) in guards.iter().zip(&contiguous).enumerate() {
            let Storage::Cpu(cpu) = &**storage else {
                bail!("checkpoints hold CPU activations only")
            };
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| anyhow!("activation {i} is not contiguous"))?;
            // as held: f32, or bf16 streams (read back as f32 and narrowed again, exactly)
            let (dtype, data): (Dtype, Cow<[u8]>) = match x.dtype() {
                DType::BF16 => (
                    Dtype::BF16,
                    cpu.as_slice::<half::bf16>()?[start..end]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>()
                        .into(),
                ),
                _ => (
                    Dtype::F32,
                    f32_le_bytes(&cpu.as_slice::<f32>()?[start..end]).into(),
                ),
            };
            acts.insert(
                format!("x.{i}"),
                OutTensor {
                    dtype,
                    shape: x.dims().to_vec(),
                    data,
                },
            );
        }
        let meta = HashMap::from([("next_block".to_string(), (block + 1).to_string())]);
        // a new name each block: the previous inputs stay valid until the index moves on
        let act_path = self
            .dir
            .join(format!("inputs-{:05}.safetensors", block + 1));
        // not fsynced: a lost file fails its hash on resume and is recomputed (module doc)
        write_atomic(&act_path, Fsync::NameOnly, &acts, meta)?;
        let mut index = self.read_index();
        index.blocks.truncate(block);
        anyhow::ensure!(
            index.blocks.len() == block,
            "checkpoint {} lacks blocks before {block}",
            self.dir.display()
        );
        index.blocks.push(entry_for(&self.block_path(block))?);
        let old = index.activations.replace(entry_for(&act_path)?);
        self.write_index(&index)?;
        if let Some(old) = old.filter(|o| self.dir.join(&o.file) != act_path) {
            std::fs::remove_file(self.dir.join(old.file)).ok();
        }
        Ok(())
    }
}

/// A block's checkpoint written on its own thread, so the next block's forwards run
/// meanwhile (writing and hashing ~all activations took 0.47 s of every 8.7 s block at
/// 32 × 2048 on the fixture). The caller finishes one save before starting the next, which
/// keeps the index moving block by block.
pub struct SaveInBackground(std::thread::JoinHandle<Result<()>>);

impl SaveInBackground {
    /// Start saving block `block`. `next_inputs` are shared, not copied: the runner
    /// replaces its tensors with new ones and never writes into them.
    pub fn start(
        checkpoint: &Checkpoint,
        block: usize,
        layers: Vec<(LinearSpec, LayerResult)>,
        log: Vec<LayerEntry>,
        next_inputs: Vec<Tensor>,
    ) -> Self {
        let checkpoint = checkpoint.clone();
        Self(std::thread::spawn(move || {
            checkpoint.save_block(block, &layers, &log, &next_inputs)
        }))
    }

    /// Wait for the save; its error, if any.
    pub fn finish(self) -> Result<()> {
        self.0
            .join()
            .map_err(|_| anyhow!("the checkpoint writer thread panicked"))?
    }
}

/// The little-endian bytes of an f32 slice, without copying.
#[cfg(target_endian = "little")]
fn f32_le_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns, u8 has alignment 1, and on a
    // little-endian target the in-memory bytes are the little-endian encoding.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn read_layer(store: &WeightStore, stem: &str, grid: UniformGrid) -> Result<LayerResult> {
    let column_loss = || -> Result<Option<Vec<f64>>> {
        if !store.contains(&format!("{stem}.column_loss")) {
            return Ok(None);
        }
        let (_, b) = store.raw(&format!("{stem}.column_loss"))?;
        Ok(Some(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ))
    };
    if store.contains(&format!("{stem}.ggml")) {
        let (info, data) = store.raw(&format!("{stem}.ggml"))?;
        let [n, row_bytes] = info.shape[..] else {
            bail!("checkpoint tensor {stem}.ggml is not 2-D")
        };
        let (_, id) = store.raw(&format!("{stem}.ggml_type"))?;
        let id = u32::from_le_bytes(
            id.try_into()
                .map_err(|_| anyhow!("checkpoint tensor {stem}.ggml_type is not one u32"))?,
        );
        let ty = GgmlType::from_id(id)
            .ok_or_else(|| anyhow!("checkpoint tensor {stem}.ggml_type: unknown GGML type {id}"))?;
        anyhow::ensure!(
            row_bytes.is_multiple_of(ty.type_size()),
            "checkpoint tensor {stem}.ggml: {row_bytes} bytes per row are not whole {ty} blocks"
        );
        return Ok(LayerResult {
            codes: LayerCodes::Ggml(GgmlQuantizedLinear {
                ty,
                out_features: n,
                in_features: row_bytes / ty.type_size() * ty.block_size(),
                data: data.to_vec(),
            }),
            column_loss: column_loss()?,
            trained_loss: None,
        });
    }
    let (ci, codes) = store.raw(&format!("{stem}.codes"))?;
    let [n, k] = ci.shape[..] else {
        bail!("checkpoint tensor {stem}.codes is not 2-D")
    };
    let (si, scales) = store.raw(&format!("{stem}.scales"))?;
    let groups = si.shape[0];
    let column_loss =
        store
            .contains(&format!("{stem}.column_loss"))
            .then(|| -> Result<Vec<f64>> {
                let (_, b) = store.raw(&format!("{stem}.column_loss"))?;
                Ok(b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect())
            });
    anyhow::ensure!(
        scales.len() == 2 * groups * n,
        "checkpoint tensor {stem}.scales has the wrong size"
    );
    let scales: Vec<f16> = scales
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect();
    let u32_of = |leaf: &str| -> Result<u32> {
        let (_, b) = store.raw(&format!("{stem}.{leaf}"))?;
        Ok(u32::from_le_bytes(b.try_into().map_err(|_| {
            anyhow!("checkpoint tensor {stem}.{leaf} is not one u32")
        })?))
    };
    let g_idx = || -> Result<Vec<u32>> {
        let (_, g_idx) = store.raw(&format!("{stem}.g_idx"))?;
        Ok(g_idx
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    if store.contains(&format!("{stem}.table")) {
        let (_, table) = store.raw(&format!("{stem}.table"))?;
        let table: Vec<f32> = table
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let g = u32_of("codebook_group_size")?;
        let exponent = f32::from_bits(u32_of("exponent")?);
        anyhow::ensure!(
            table.len().is_power_of_two() && (4..=256).contains(&table.len()),
            "checkpoint tensor {stem}.table has {} entries, not 2^bits",
            table.len()
        );
        return Ok(LayerResult {
            codes: LayerCodes::Codebook(CodebookQuantizedLinear {
                out_features: n,
                in_features: k,
                bits: table.len().trailing_zeros() as u8,
                group_size: if g == 0 {
                    GroupSize::PerChannel
                } else {
                    GroupSize::Columns(g as usize)
                },
                exponent,
                table,
                codes: codes.to_vec(),
                scales,
                g_idx: g_idx()?,
            }),
            column_loss: column_loss.transpose()?,
            trained_loss: None,
        });
    }
    if store.contains(&format!("{stem}.width_tables")) {
        let f32s = |leaf: &str| -> Result<Vec<f32>> {
            let (_, b) = store.raw(&format!("{stem}.{leaf}"))?;
            Ok(b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let (_, widths) = store.raw(&format!("{stem}.widths"))?;
        let (_, bits) = store.raw(&format!("{stem}.width_bits"))?;
        let exponents = f32s("width_exponents")?;
        let all = f32s("width_tables")?;
        let g = u32_of("mixed_group_size")?;
        anyhow::ensure!(
            exponents.len() == bits.len()
                && bits.iter().all(|b| (2..=8).contains(b))
                && all.len() == bits.iter().map(|&b| 1usize << b).sum::<usize>(),
            "checkpoint tensors {stem}.width_* do not describe one table per width"
        );
        let mut at = 0;
        let tables = bits
            .iter()
            .zip(&exponents)
            .map(|(&b, &exponent)| {
                let table = all[at..at + (1 << b)].to_vec();
                at += 1 << b;
                WidthCodebook {
                    bits: b,
                    exponent,
                    table,
                }
            })
            .collect();
        return Ok(LayerResult {
            codes: LayerCodes::MixedCodebook(MixedCodebookQuantizedLinear {
                out_features: n,
                in_features: k,
                widths: widths.to_vec(),
                group_size: (g > 0).then_some(g as usize),
                codes: codes.to_vec(),
                scales,
                tables,
            }),
            column_loss: column_loss.transpose()?,
            trained_loss: None,
        });
    }
    let (_, zeros) = store.raw(&format!("{stem}.zeros"))?;
    let codes = if store.contains(&format!("{stem}.widths")) {
        let (_, widths) = store.raw(&format!("{stem}.widths"))?;
        let (_, sym) = store.raw(&format!("{stem}.sym"))?;
        let (_, g) = store.raw(&format!("{stem}.mixed_group_size"))?;
        let g = u32::from_le_bytes(g.try_into().map_err(|_| {
            anyhow::anyhow!("checkpoint tensor {stem}.mixed_group_size is not one u32")
        })?);
        LayerCodes::Mixed(MixedQuantizedLinear {
            out_features: n,
            in_features: k,
            sym: sym.first() == Some(&1),
            widths: widths.to_vec(),
            group_size: (g > 0).then_some(g as usize),
            codes: codes.to_vec(),
            scales,
            zeros: zeros.to_vec(),
        })
    } else {
        LayerCodes::Uniform(QuantizedLinear {
            out_features: n,
            in_features: k,
            grid,
            codes: codes.to_vec(),
            scales,
            zeros: zeros.to_vec(),
            g_idx: g_idx()?,
        })
    };
    Ok(LayerResult {
        codes,
        column_loss: column_loss.transpose()?,
        trained_loss: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{PowerGrid, PowerLevels, Rtn};

    /// FNV-1a's published 64-bit test vectors, and a file hashed chunk by chunk equal to
    /// its bytes hashed whole (the file spans several chunks and ends inside one).
    #[test]
    fn file_hash_is_fnv1a_of_the_whole_file() {
        assert_eq!(fnv1a_bytes(b""), "cbf29ce484222325");
        assert_eq!(fnv1a_bytes(b"a"), "af63dc4c8601ec8c");
        assert_eq!(fnv1a_bytes(b"foobar"), "85944171f73967e8");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let data: Vec<u8> = (0..(5usize << 19) + 123).map(|i| (i * 131 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        assert_eq!(
            hash_file(&path).unwrap(),
            (data.len() as u64, fnv1a_bytes(&data))
        );
    }

    /// A layer survives a checkpoint exactly (codes, column losses, and whatever its kind
    /// stores).
    fn round_trips(codes: LayerCodes, n: usize, k: usize) {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoint::new(dir.path().join("ck"), serde_json::json!({"test": 1}));
        let spec = LinearSpec {
            name: "model.layers.0.self_attn.q_proj".into(),
            out_features: n,
            in_features: k,
            bias: false,
        };
        let result = LayerResult {
            codes: codes.clone(),
            column_loss: Some(vec![0.5; k]),
            trained_loss: None,
        };
        let x = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        ck.save_block(0, &[(spec.clone(), result)], &[], &[x])
            .unwrap();
        let unused = UniformGrid::new(8, GroupSize::PerChannel, true).unwrap();
        let resume = ck
            .load(unused, &Device::Cpu)
            .unwrap()
            .expect("a checkpoint");
        assert_eq!(resume.next_block, 1);
        let (name, restored) = &resume.layers[0];
        assert_eq!(name, &spec.name);
        assert_eq!(restored.codes, codes);
        assert_eq!(restored.column_loss.as_deref(), Some(&vec![0.5; k][..]));
    }

    fn layer(weight: &[f32], n: usize, k: usize) -> crate::quant::LayerToQuantize<'_> {
        crate::quant::LayerToQuantize {
            name: "model.layers.0.self_attn.q_proj",
            weight,
            out_features: n,
            in_features: k,
            hessian: None,
        }
    }

    /// A codebook (NUPES) layer: codes, scales, table, exponent, groups.
    #[test]
    fn codebook_layer_round_trips() {
        let (n, k) = (6, 80);
        let weight: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5).powi(3))
            .collect();
        let grid = PowerGrid::new(3, GroupSize::Columns(32), PowerLevels::All, None).unwrap();
        let codes: LayerCodes = Rtn { grid }.round(&layer(&weight, n, k)).unwrap().into();
        assert!(matches!(&codes, LayerCodes::Codebook(q) if q.exponent < 1.0));
        round_trips(codes, n, k);
    }

    /// BAQ's widths on power codebooks: widths, codes, scales, a table and an exponent per
    /// width, with and without range groups.
    #[test]
    fn mixed_codebook_layer_round_trips() {
        let (n, k) = (5, 90);
        let weight: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5).powi(3))
            .collect();
        let widths: Vec<u8> = (0..k).map(|j| [0u8, 2, 3, 5][j % 4]).collect();
        for group in [None, Some(16)] {
            let q = crate::quant::baq::codebook::rtn_mixed_power(
                &layer(&weight, n, k),
                &widths,
                group,
                PowerLevels::Extended,
                crate::quant::grid::RangeFit::MinMax,
            )
            .unwrap();
            assert_eq!(q.tables.len(), 3);
            round_trips(LayerCodes::MixedCodebook(q), n, k);
        }
    }

    /// A GGML layer: its blocks and type (a K-quant and a 32-weight type).
    #[test]
    fn ggml_layer_round_trips() {
        let (n, k) = (4, 512);
        let weight: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5).powi(3))
            .collect();
        for ty in [GgmlType::Q4K, GgmlType::Q5_0] {
            let grid = crate::quant::grid::GgmlGrid { ty };
            let codes: LayerCodes = Rtn { grid }.round(&layer(&weight, n, k)).unwrap().into();
            assert!(matches!(&codes, LayerCodes::Ggml(q) if q.ty == ty));
            round_trips(codes, n, k);
        }
    }
}
