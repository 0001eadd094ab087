//! Non-overlapping evaluation windows (methods.md §1.4) run through one or more models in
//! lock-step. Each window is evaluated on its own from position 0 and the partial tail is
//! dropped. Logits reach the caller a chunk of rows at a time, the same rows of every model
//! together, so no run ever holds a window's whole `[seqlen, vocab]` logits.

use crate::model::layers::cpu_slice;
use crate::model::CausalLm;
use crate::error::fail;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;

/// The windows of a tokenized corpus that an evaluation covers.
#[derive(Debug, Clone, Copy)]
pub struct Windows<'a> {
    ids: &'a [u32],
    seqlen: usize,
    count: usize,
}

impl<'a> Windows<'a> {
    /// The first `limit` (default: all) whole windows of `seqlen` tokens of `ids`.
    pub fn new(ids: &'a [u32], seqlen: usize, limit: Option<usize>) -> Result<Self> {
        if seqlen < 2 {
            fail!(InvalidOption, "--seqlen must be at least 2");
        }
        let available = ids.len() / seqlen;
        if available == 0 {
            fail!(
                InvalidInput,
                "the text has {} tokens, fewer than one window of {seqlen}",
                ids.len()
            );
        }
        let count = limit.map_or(available, |n| n.min(available));
        if count == 0 {
            fail!(InvalidOption, "--limit 0 evaluates nothing");
        }
        Ok(Self { ids, seqlen, count })
    }

    pub fn seqlen(&self) -> usize {
        self.seqlen
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The tokens of all evaluated windows, window after window.
    pub fn tokens(&self) -> &'a [u32] {
        &self.ids[..self.count * self.seqlen]
    }

    /// Tokens predicted per window (the first token of a window is only context).
    pub fn predicted_per_window(&self) -> usize {
        self.seqlen - 1
    }

    pub fn predicted_tokens(&self) -> usize {
        self.count * (self.seqlen - 1)
    }
}

/// Consecutive predicted positions of one window, as every model sees them.
pub struct Chunk<'a> {
    pub window: usize,
    /// Row `r` holds the logits at position `row0 + r`, which predict `targets[r]`.
    pub row0: usize,
    pub targets: &'a [u32],
    /// One `[rows, vocab]` row-major block per model, in the order the models were given.
    pub logits: &'a [&'a [f32]],
    pub vocab: usize,
    /// The window's last chunk.
    pub last: bool,
}

impl Chunk<'_> {
    pub fn rows(&self) -> usize {
        self.targets.len()
    }
}

/// Rows of logits held at once, summed over the models (bounds the `[rows, vocab]` buffers:
/// 1024 rows of a 49k vocabulary are 200 MB in f32).
pub const HEAD_CHUNK_ROWS: usize = 1024;

/// Run `models` over `windows`, `batch` windows per forward pass, and hand `on_chunk` the
/// logits of each chunk of rows, in window and row order.
pub fn for_each_chunk(
    models: &[&CausalLm],
    windows: &Windows,
    batch: usize,
    mut on_chunk: impl FnMut(&Chunk) -> Result<()>,
) -> Result<()> {
    ensure!(!models.is_empty(), "no model to evaluate");
    let l = windows.seqlen();
    let vocab = models[0].config.vocab_size;
    for m in models {
        ensure!(
            m.config.vocab_size == vocab,
            "the models' vocabularies differ ({} and {vocab} tokens): they cannot be compared token by token",
            m.config.vocab_size
        );
    }
    let rows_per_chunk = (HEAD_CHUNK_ROWS / models.len()).max(64);
    let contexts = models
        .iter()
        .map(|m| m.context(l))
        .collect::<Result<Vec<_>>>()?;
    let batch = batch.max(1);
    let mut first = 0;
    while first < windows.count() {
        let b = batch.min(windows.count() - first);
        let chunk_ids = &windows.tokens()[first * l..(first + b) * l];
        // hidden states after the final norm, `[b, l-1, hidden]` per model: small next to
        // logits; the last position predicts nothing inside the window
        let hidden = models
            .iter()
            .zip(&contexts)
            .map(|(m, ctx)| {
                let input = Tensor::from_slice(chunk_ids, (b, l), m.device())?;
                let h = m.run_blocks(m.embed(&input)?, ctx)?;
                m.final_norm(&h.narrow(1, 0, l - 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        for w in 0..b {
            let targets = &chunk_ids[w * l + 1..(w + 1) * l];
            let mut row = 0;
            while row < l - 1 {
                let rows = rows_per_chunk.min(l - 1 - row);
                let logits = models
                    .iter()
                    .zip(&hidden)
                    .map(|(m, h)| {
                        let t = m.lm_head.forward(&h.get(w)?.narrow(0, row, rows)?)?;
                        Ok(t.to_dtype(DType::F32)?
                            .to_device(&Device::Cpu)?
                            .contiguous()?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let guards: Vec<_> = logits.iter().map(|t| t.storage_and_layout()).collect();
                let slices = guards
                    .iter()
                    .map(|(s, layout)| cpu_slice::<f32>(s, layout))
                    .collect::<Result<Vec<_>>>()?;
                for s in &slices {
                    ensure!(
                        s.len() == rows * vocab,
                        "logits of {} values for {rows} rows of a {vocab}-token vocabulary",
                        s.len()
                    );
                }
                on_chunk(&Chunk {
                    window: first + w,
                    row0: row,
                    targets: &targets[row..row + rows],
                    logits: &slices,
                    vocab,
                    last: row + rows == l - 1,
                })?;
                row += rows;
            }
        }
        first += b;
    }
    Ok(())
}

/// Check every target against the vocabulary (a tokenizer larger than the model's head).
pub fn check_targets(targets: &[u32], vocab: usize) -> Result<()> {
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        fail!(
            InvalidInput,
            "token id {t} is outside the model's vocabulary of {vocab}"
        );
    }
    Ok(())
}

/// A bar over `windows` windows (hidden unless `show`), named `label`; callers put tokens/s
/// and running figures in its message.
pub fn progress_bar(show: bool, windows: usize, label: &str) -> ProgressBar {
    crate::util::progress_bar(show, windows, "windows", label)
}
