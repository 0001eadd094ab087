//! Saved base logits (`ppl --save-logits FILE`, read back by `--kl-base FILE`): the top-k
//! tokens of each predicted position with their raw logits, the log-normaliser, the log of
//! the mass outside the top-k and the NLL of the correct token, plus the token ids and the
//! window layout so that a file made from other text, windows or a different tokenizer is
//! refused with the reason.
//!
//! Layout (little-endian): `BSLOGITS` · u32 version · u32 header length · header JSON
//! ([`LogitsHeader`]) · u32 token ids of all windows · per predicted token, window after
//! window: f64 lse, f64 ln(tail mass), f64 NLL, k × u32 id, k × f32 logit.

use super::divergence::{TopK, TopKRow};
use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"BSLOGITS";
const VERSION: u32 = 1;

/// What a logits file was made from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogitsHeader {
    /// The base model, as the user named it.
    pub model: String,
    /// The corpus, as `ppl` names it.
    pub corpus: String,
    pub vocab: usize,
    pub seqlen: usize,
    pub windows: usize,
    pub top_k: usize,
}

impl LogitsHeader {
    fn record_bytes(&self) -> usize {
        24 + 8 * self.top_k
    }
}

/// Writes a logits file as the base is evaluated: to `FILE.partial`, renamed into place by
/// [`LogitsWriter::finish`] once every token is written.
pub struct LogitsWriter {
    out: BufWriter<File>,
    path: PathBuf,
    partial: PathBuf,
    header: LogitsHeader,
    expected: usize,
    written: usize,
}

impl LogitsWriter {
    /// Start a file for `header`'s windows of `tokens` (`windows × seqlen` ids).
    pub fn create(path: &Path, header: LogitsHeader, tokens: &[u32]) -> Result<Self> {
        ensure!(header.top_k > 0, "--top-k must be at least 1");
        ensure!(
            tokens.len() == header.windows * header.seqlen,
            "{} tokens for {} windows of {}",
            tokens.len(),
            header.windows,
            header.seqlen
        );
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial)
            .with_context(|| format!("creating logits file {}", partial.display()))?;
        let mut out = BufWriter::new(file);
        let json = serde_json::to_vec(&header)?;
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            out.write_all(MAGIC)?;
            out.write_all(&VERSION.to_le_bytes())?;
            out.write_all(&(json.len() as u32).to_le_bytes())?;
            out.write_all(&json)?;
            for t in tokens {
                out.write_all(&t.to_le_bytes())?;
            }
            Ok(())
        };
        write(&mut out).with_context(|| format!("writing {}", partial.display()))?;
        Ok(Self {
            out,
            path: path.to_path_buf(),
            partial,
            expected: header.windows * (header.seqlen - 1),
            header,
            written: 0,
        })
    }

    pub fn header(&self) -> &LogitsHeader {
        &self.header
    }

    /// Append the next tokens' records.
    pub fn write(&mut self, rows: &[TopK]) -> Result<()> {
        let mut buf = Vec::with_capacity(rows.len() * self.header.record_bytes());
        for r in rows {
            ensure!(
                r.ids.len() == self.header.top_k.min(self.header.vocab),
                "a record of {} tokens in a top-{} file",
                r.ids.len(),
                self.header.top_k
            );
            buf.extend_from_slice(&r.lse.to_le_bytes());
            buf.extend_from_slice(&r.log_tail.to_le_bytes());
            buf.extend_from_slice(&r.nll.to_le_bytes());
            r.ids
                .iter()
                .for_each(|i| buf.extend_from_slice(&i.to_le_bytes()));
            r.logits
                .iter()
                .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
        }
        self.out
            .write_all(&buf)
            .with_context(|| format!("writing {}", self.partial.display()))?;
        self.written += rows.len();
        Ok(())
    }

    /// Flush and move the finished file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        ensure!(
            self.written == self.expected,
            "{} of {} token records written",
            self.written,
            self.expected
        );
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.partial.display()))?;
        std::fs::rename(&self.partial, &self.path).with_context(|| {
            format!(
                "renaming {} to {}",
                self.partial.display(),
                self.path.display()
            )
        })?;
        Ok(self.path)
    }
}

/// Reads a logits file back, chunk by chunk, in the order it was written.
pub struct LogitsReader {
    input: BufReader<File>,
    path: PathBuf,
    header: LogitsHeader,
    tokens: Vec<u32>,
    /// Token records read so far.
    read: usize,
    total: usize,
}

/// Records of consecutive tokens.
#[derive(Debug, Default)]
pub struct TopKBlock {
    k: usize,
    lse: Vec<f64>,
    log_tail: Vec<f64>,
    nll: Vec<f64>,
    ids: Vec<u32>,
    logits: Vec<f32>,
}

impl TopKBlock {
    pub fn len(&self) -> usize {
        self.lse.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lse.is_empty()
    }

    pub fn row(&self, i: usize) -> TopKRow<'_> {
        let k = self.k;
        TopKRow {
            lse: self.lse[i],
            log_tail: self.log_tail[i],
            nll: self.nll[i],
            ids: &self.ids[i * k..(i + 1) * k],
            logits: &self.logits[i * k..(i + 1) * k],
        }
    }
}

impl LogitsReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("opening logits file {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut input = BufReader::new(file);
        let what = || format!("{} is not a bitsmith logits file", path.display());
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).with_context(what)?;
        ensure!(&magic == MAGIC, "{} (no BSLOGITS header)", what());
        let version = read_u32(&mut input).with_context(what)?;
        ensure!(
            version == VERSION,
            "{} is logits file version {version}; this bitsmith reads version {VERSION}",
            path.display()
        );
        let n = read_u32(&mut input).with_context(what)? as usize;
        ensure!(n as u64 <= len, "{} (header length {n})", what());
        let mut json = vec![0u8; n];
        input.read_exact(&mut json).with_context(what)?;
        let header: LogitsHeader = serde_json::from_slice(&json).with_context(what)?;
        ensure!(
            header.seqlen >= 2 && header.top_k >= 1 && header.vocab >= 1,
            "{}: header {header:?} describes no tokens",
            path.display()
        );
        let k = header.top_k.min(header.vocab);
        let n_tokens = header.windows * header.seqlen;
        let total = header.windows * (header.seqlen - 1);
        let expect = 16 + n as u64 + 4 * n_tokens as u64 + total as u64 * (24 + 8 * k) as u64;
        ensure!(
            len == expect,
            "{} holds {len} bytes; its header ({} windows of {}, top-{k}) means {expect} (truncated or not finished?)",
            path.display(),
            header.windows,
            header.seqlen
        );
        let mut raw = vec![0u8; 4 * n_tokens];
        input.read_exact(&mut raw)?;
        let tokens = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Self {
            input,
            path: path.to_path_buf(),
            header,
            tokens,
            read: 0,
            total,
        })
    }

    pub fn header(&self) -> &LogitsHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuse to compare against windows the file was not made from: another window
    /// length, more windows than it holds, another vocabulary or other tokens.
    pub fn check_matches(&self, tokens: &[u32], seqlen: usize, vocab: usize) -> Result<()> {
        let (h, p) = (&self.header, self.path.display());
        ensure!(
            h.seqlen == seqlen,
            "{p} holds windows of {} tokens; this run uses --seqlen {seqlen}",
            h.seqlen
        );
        let windows = tokens.len() / seqlen;
        ensure!(
            windows <= h.windows,
            "{p} holds {} windows; this run evaluates {windows} (pass --limit {} or save more windows)",
            h.windows,
            h.windows
        );
        ensure!(
            h.vocab == vocab,
            "{p} was saved from a model with a vocabulary of {} tokens; this model has {vocab} (a different tokenizer)",
            h.vocab
        );
        if let Some(i) = (0..tokens.len()).find(|&i| tokens[i] != self.tokens[i]) {
            bail!(
                "{p} was saved from other tokens: window {} position {} is token {} there and {} here \
                 (a different text, split or tokenizer; the file's corpus: {})",
                i / seqlen,
                i % seqlen,
                self.tokens[i],
                tokens[i],
                h.corpus
            );
        }
        Ok(())
    }

    /// The next `rows` records.
    pub fn read_block(&mut self, rows: usize, block: &mut TopKBlock) -> Result<()> {
        ensure!(
            self.read + rows <= self.total,
            "{} ends after {} token records",
            self.path.display(),
            self.total
        );
        let k = self.header.top_k.min(self.header.vocab);
        let mut raw = vec![0u8; rows * (24 + 8 * k)];
        self.input
            .read_exact(&mut raw)
            .with_context(|| format!("reading {}", self.path.display()))?;
        block.k = k;
        block.lse.clear();
        block.log_tail.clear();
        block.nll.clear();
        block.ids.clear();
        block.logits.clear();
        let f64_at =
            |b: &[u8], o: usize| f64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        for rec in raw.chunks_exact(24 + 8 * k) {
            block.lse.push(f64_at(rec, 0));
            block.log_tail.push(f64_at(rec, 8));
            block.nll.push(f64_at(rec, 16));
            let (ids, logits) = rec[24..].split_at(4 * k);
            block.ids.extend(
                ids.chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            block.logits.extend(
                logits
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        if let Some(&bad) = block.ids.iter().find(|&&i| i as usize >= self.header.vocab) {
            bail!(
                "{} is corrupt: token id {bad} in a vocabulary of {}",
                self.path.display(),
                self.header.vocab
            );
        }
        self.read += rows;
        Ok(())
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}
