use super::human_bytes;
use crate::pack::compat::{checkpoint_format_warning, group_size_warning};
use crate::pack::{quantize_to, WriteOptions, ZeroConvention};
use crate::quant::flexround::{FlexInit, FlexRoundSpec, Reconstruct};
use crate::quant::grid::{GgmlType, GgufFileType, RangeFit};
use crate::quant::pipeline::target_linears;
use crate::quant::recipe::{
    default_ggml_types, AllocationSpec, BaqGgmlSpec, BaqScope, BaqSpec, CalibrationSpec, GptqSpec,
    Recipe, RoundingSpec, TransformSpec,
};
use crate::quant::run::checkpoint_dir;
use crate::quant::transform::OstQuantSpec;
use crate::quant::{
    GridSpec, GroupSize, PowerLevels, RunOptions, SourceModel,
};
use crate::signals::note_on_interrupt;
use anyhow::{bail, ensure, Result};
use std::path::PathBuf;

/// `--method`: a preset recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Rtn,
    Gptq,
    Baq,
    FlexRound,
    /// NUPES (methods.md §5): the power grid, RTN or (`--rounding gptq`) GPTQ on it.
    Nupes,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Rtn => "rtn",
            Self::Gptq => "gptq",
            Self::Baq => "baq",
            Self::FlexRound => "flexround",
            Self::Nupes => "nupes",
        }
    }
}

/// Parses `--method`; OSTQuant, a transform, is pointed at where it lives.
fn parse_method(s: &str) -> Result<Method, String> {
    match s {
        "rtn" => Ok(Method::Rtn),
        "gptq" => Ok(Method::Gptq),
        "baq" => Ok(Method::Baq),
        "flexround" => Ok(Method::FlexRound),
        "nupes" => Ok(Method::Nupes),
        "ostquant" => Err(
            "OSTQuant is a transform that goes before any method: --transform ostquant \
             (e.g. --transform ostquant --method gptq --bits 4 --group-size -1 --sym)"
                .into(),
        ),
        m => Err(format!(
            "unknown method `{m}` (available: rtn, gptq, baq, flexround, nupes)"
        )),
    }
}

/// `--range`, or its default for the run: the shrink search for `gptq` and for `baq` with
/// its GPTQ rounding, which pass the Hessian's diagonal to weigh it, and after OSTQuant,
/// whose student trained on a searched range; min–max otherwise. Measured on the fixture
/// (README, "Range fits"): with the Hessian the search wins at every grid tried, for ×1.10
/// GPTQ time at w4 g128 and ×1.25 BAQ time at 3.206 g128 (×1.63 for a small per-channel
/// BAQ run), within the "no more than double" budget; data-free, the unweighted search
/// loses on asymmetric grids and makes RTN 20–50× slower; FlexRound and NUPES have not
/// been measured with it.
fn range_kind(a: &Args) -> RangeKind {
    if let Some(r) = a.range {
        return r;
    }
    // FlexRound from GPTQ's start fits that start's range as GPTQ does (Hessian-weighted):
    // on the fixture at w3 g128 it ends at 28.77 from the searched range against 33.87 from
    // min–max (FlexRound's 40 steps move `s1` only a few per cent)
    let gptq_start = a.init == FlexInit::Gptq;
    let hessian_weighted = match a.method {
        Method::Gptq => true,
        Method::Baq => match a.rounding {
            None | Some(RoundingKind::Gptq) => true,
            Some(RoundingKind::Flexround) => gptq_start,
            _ => false,
        },
        Method::FlexRound => gptq_start,
        _ => false,
    };
    if hessian_weighted || a.transform.contains(&TransformKind::Ostquant) {
        RangeKind::Shrink
    } else {
        RangeKind::Minmax
    }
}

/// `--range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RangeKind {
    /// Each group's min and max.
    Minmax,
    /// Symmetric grids: the largest magnitude on the extra negative level, as Q4_0.
    FullRange,
    /// Search the shrink of the range that minimises the Hessian-weighted error, each
    /// candidate also with its least-squares scale for the codes it chose.
    Search,
    /// The shrink search alone (no least-squares scale refit).
    Shrink,
}

impl RangeKind {
    fn fit(self) -> RangeFit {
        match self {
            Self::Minmax => RangeFit::MinMax,
            Self::FullRange => RangeFit::FullRange,
            Self::Search => RangeFit::search(),
            Self::Shrink => RangeFit::shrink_search(),
        }
    }
}

/// `--rounding`: how the points of BAQ's widths or NUPES' power grid are picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoundingKind {
    /// Round to nearest (no calibration).
    Rtn,
    /// GPTQ's error feedback (calibration).
    Gptq,
    /// FlexRound's learned division (calibration).
    Flexround,
    /// NUPES learned: FlexRound's division on the power grid with each layer's exponent
    /// learned too (calibration; --method nupes only).
    Learned,
}

/// `--codebook`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CodebookKind {
    /// NUPES' power codebook.
    Power,
}

/// `--levels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LevelsKind {
    Extended,
    All,
    Symmetric,
}

/// `--transform`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransformKind {
    /// Random Hadamard rotation of the residual stream (QuaRot-style, no online op).
    Hadamard,
    /// OSTQuant: rotations and scalings learned under the KL-Top loss with the weights
    /// fake-quantized (see the OSTQuant flags), plus R4, a Hadamard before down_proj that
    /// runs online (bitsmith runs it; --no-online-hadamard for a plain checkpoint).
    Ostquant,
    /// QuaRot's online Hadamard before down_proj: down_proj's weight is rotated and the
    /// model runs the matching rotation on down_proj's input. Only bitsmith (or another
    /// runtime with this op) runs the output correctly.
    DownHadamard,
}

#[derive(clap::Args)]
#[command(
    long_about = "Quantize every linear layer inside the decoder blocks (embeddings and lm_head \
stay in their original precision unless --lm-head) and write OUT: a folder with GPTQ-layout packed \
weights (qweight/qzeros/scales/g_idx), config.json with quantization_config, and the tokenizer. \
OUT is written to a hidden temporary folder and renamed only when complete.\n\n\
Methods: rtn (round to nearest, no data), gptq (Hessian-based error feedback), baq (GPTQ with \
a bit width per input column allocated from a first GPTQ pass's losses; written in bitsmith's \
mixed-width layout; --rounding picks another rounding for its widths), flexround (learned \
rounding by element-wise division, trained block by block against the float model's block \
outputs, or per linear through its Hessian with --reconstruct layer; started from RTN or, with \
--init gptq, from GPTQ's solution) and nupes (a power-law codebook per layer, rounded to nearest, \
with --rounding gptq, --rounding flexround or --rounding learned (the exponent learned too); \
written in bitsmith's codebook layout). Transforms (--transform) run \
first and compose with any method: hadamard (a random rotation of the residual stream), \
down-hadamard (an online Hadamard before down_proj) and ostquant (rotations and scalings \
trained under the KL-Top loss against the float model, on the calibration text; its state is \
saved in the checkpoint every 10 steps and resumed, and the trained transforms are written to \
OUT/ostquant.safetensors for --ost-transforms). gptq, baq, flexround and nupes \
--rounding gptq or flexround need calibration text: the embedded WikiText-2 validation split \
by default, or --calib FILE. A gptq run checkpoints \
after every block next to OUT; running the same command again resumes from the last finished block \
(a checkpoint made with other settings is an error; --fresh or --overwrite discards it). Only one \
run at a time may write OUT: a second one stops at once, naming the first one's pid."
)]
pub struct Args {
    /// Model folder, Hugging Face repo id or `.gguf` file (decoded once to f32 into
    /// bitsmith's cache, then quantized like any float model).
    pub model: String,
    /// Output folder (`--format gguf`: the `.gguf` file).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Output format: `bitsmith` (a Hugging Face folder: the GPTQ layout, or bitsmith's
    /// mixed-width and codebook layouts) or `gguf` (one llama.cpp file whose linears are
    /// solved directly on the GGML block type --type names: --method gptq runs GPTQ's
    /// error feedback on the very blocks llama.cpp reads; --method rtn writes what
    /// `llama-quantize` writes without an importance matrix; --method flexround trains the
    /// rounding on them (the K-quants keep GPTQ's sub-block scales, IQ4_NL its table);
    /// --method baq chooses each linear's type, then rounds with --rounding gptq, rtn or
    /// flexround).
    #[arg(long, default_value = "bitsmith", value_parser = ["bitsmith", "gguf"])]
    pub format: String,
    /// `--format gguf`: the GGML block type of the linears (Q4_K, Q5_K, Q6_K, Q3_K, Q2_K,
    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL), or one of llama.cpp's mixes (Q4_K_M, Q4_K_S,
    /// Q5_K_M, Q5_K_S, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K_S: the types `llama-quantize` gives each
    /// tensor by role and depth). A layer whose input width is not whole blocks of its
    /// type is solved on llama.cpp's fallback type (a 576-wide layer: Q4_K → Q5_0).
    #[arg(long = "type")]
    pub ggml_type: Option<GgufFileType>,
    /// `--format gguf`: the GGML type of the token embedding (and of an untied head).
    /// Default: F32 with a single block type; with a mix, llama.cpp's choice (Q6_K, or
    /// Q8_0 where the rows are not whole blocks).
    #[arg(long)]
    pub embedding_type: Option<GgmlType>,
    /// `--format gguf`: llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) when bitsmith
    /// does not recognise the tokenizer's.
    #[arg(long)]
    pub tokenizer_pre: Option<String>,
    /// `--format gguf`: write no vocabulary (a model whose tokenizer is not a BPE: neither
    /// byte-level nor converted from SentencePiece).
    #[arg(long)]
    pub no_vocab: bool,
    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Quantization method (a preset recipe): rtn, gptq, baq, flexround or nupes.
    #[arg(long, default_value = "rtn", value_parser = parse_method)]
    pub method: Method,
    /// Run a recipe file (JSON: transforms, allocation, rounding, calibration; see the
    /// README) instead of building one from the flags. Every packed model's bitsmith.json
    /// holds the recipe it was made with, and that file reproduces the run.
    #[arg(long, conflicts_with_all = ["method", "bits", "group_size", "allowed_bits", "code_bits",
        "measurement", "allocate", "theta", "sym", "lm_head", "calib", "nsamples", "seqlen", "seed",
        "damp", "act_order", "static_groups", "block_size", "no_true_sequential", "transform",
        "transform_seed", "range", "refit", "rounding", "init", "reconstruct", "iters", "batch", "lr",
        "s4", "bf16_streams", "exponent", "levels", "codebook", "ost_steps", "ost_batch", "ost_seqlen", "ost_lr_rotation",
        "ost_lr_scale", "ost_top_k", "ost_bits", "ost_group", "ost_range_steps", "no_online_hadamard",
        "ost_transforms", "ost_init", "f32_head", "ggml_type", "allowed_types"])]
    pub recipe: Option<PathBuf>,
    /// Transforms applied to the float model before quantizing, in order: `hadamard`
    /// rotates the residual stream by a random Hadamard matrix (the float model computes
    /// the same function; the head becomes its own f32 tensor); `down-hadamard` is
    /// QuaRot's online Hadamard before down_proj (down_proj's weight is rotated, and
    /// config.json's `bitsmith_online_hadamard` tells the runtime to rotate down_proj's
    /// input: the output then needs bitsmith, or another runtime with this op, to run;
    /// transformers, vLLM and GPTQModel ignore the key and compute wrong outputs);
    /// `ostquant` trains rotations and scalings (and R4, that online Hadamard, unless
    /// --no-online-hadamard) against the float model: see the OSTQuant flags. Deploy it
    /// with a searched range (--range shrink): the student was trained on one.
    #[arg(long, value_enum)]
    pub transform: Vec<TransformKind>,
    /// Seed of the transforms' random signs (and of OSTQuant's training text).
    #[arg(long, default_value_t = 0)]
    pub transform_seed: u64,
    /// `--transform hadamard` or `ostquant`: store the rotated head and embedding in f32
    /// (the float model exact to f32 rounding) instead of the source's dtype (the default:
    /// a bf16 source keeps them in bf16, the bytes the untransformed model reads per token).
    #[arg(long)]
    pub f32_head: bool,
    #[command(flatten)]
    pub ost: super::ost_flags::OstFlags,
    /// Bits per weight: 2, 3, 4 or 8 for rtn/gptq, 2 to 8 for nupes; for baq the average stored bits per
    /// weight (codes, scales, zeros, permutation), fractional allowed (e.g. 2.5), met in
    /// every layer to within one column's codes (see --code-bits).
    #[arg(long, default_value_t = 4.0)]
    pub bits: f64,
    /// Input columns per scale/zero group; -1 for one group per output channel. A width
    /// that is not a multiple gets a smaller last group. Default 128 (rtn, gptq). baq:
    /// groups of this many equal-width columns inside each width run; default -1, one range
    /// per output row and width (the paper).
    #[arg(long, allow_hyphen_values = true)]
    pub group_size: Option<i64>,
    /// BAQ: allowed per-column widths (0 allows pruning a column).
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,7,8")]
    pub allowed_bits: Vec<u8>,
    /// BAQ with --format gguf: the GGML block types a linear may take (default: all of
    /// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL whose blocks tile
    /// its rows). --bits is then the stored
    /// bits per weight over all linears (blocks with their scales), spent model-wide.
    #[arg(long, value_delimiter = ',')]
    pub allowed_types: Option<Vec<GgmlType>>,
    /// BAQ: make --bits count code bits only (the paper's R̄) instead of everything stored.
    #[arg(long)]
    pub code_bits: bool,
    /// BAQ: reuse the pass-1 column losses saved by an earlier run (its output folder or
    /// its `column_losses.safetensors`; with --format gguf, the
    /// `<OUT>.column_losses.safetensors` written beside an earlier BAQ GGUF) instead of
    /// measuring again. Only the names and widths are checked: the run must have measured
    /// the same model, transforms and calibration (and BAQ over GGML types measures at 4
    /// bits per channel).
    #[arg(long)]
    pub measurement: Option<PathBuf>,
    /// BAQ: `layer` gives every layer the budget on its own (the paper); `model` spends one
    /// budget over all layers where the loss model says bits help most.
    #[arg(long, default_value = "layer", value_enum)]
    pub allocate: BaqScope,
    /// BAQ: exponent θ of the loss model ℓ(R) = c·2^(−θR).
    #[arg(long, default_value_t = 1.95)]
    pub theta: f64,
    /// How grid points are picked, for --method baq (`gptq`, the default; `rtn`; or
    /// `flexround` with the FlexRound options below) and --method nupes (`rtn`, data-free,
    /// the default; `gptq`; `flexround`, the learned division on the power grid's levels; or
    /// `learned`, that division with each layer's exponent learned too).
    #[arg(long, value_enum)]
    pub rounding: Option<RoundingKind>,
    /// NUPES: a fixed power-grid exponent in [0.2, 1] instead of searching one per layer.
    #[arg(long)]
    pub exponent: Option<f32>,
    /// NUPES: which codes carry a level: `extended` (the default: all codes, zero a level,
    /// sign(k)(|k|/(Q+½))^(1/a) for k = −(Q+1)..Q, exactly the symmetric uniform grid at a =
    /// 1), `all` (±((k+½)/(Q+½))^(1/a), no zero level) or `symmetric` (±(k/Q)^(1/a), one
    /// code spare).
    #[arg(long, value_enum, default_value = "extended")]
    pub levels: LevelsKind,
    /// BAQ: put every width on NUPES' power codebook (its --levels; the exponent fitted
    /// per width and layer on that width's columns) instead of the uniform grid, written in
    /// the mixed-codebook layout (one f16 scale per range group and row, no zero points, a
    /// table per width) and served by the lookup-table kernels.
    #[arg(long, value_enum)]
    pub codebook: Option<CodebookKind>,
    /// Symmetric grid (zero point fixed at 2^(bits-1)); default asymmetric.
    #[arg(long)]
    pub sym: bool,
    /// How each group's scale (and zero) is fitted: `minmax` (the group's min and max),
    /// `full-range` (symmetric grids: the largest magnitude on the extra negative level, as
    /// llama.cpp's Q4_0 does), `search` (the shrink of the range that minimises the
    /// reconstruction error weighted by the Hessian's diagonal, or unweighted without
    /// calibration; symmetric grids try both conventions; each candidate also with the
    /// least-squares scale of the codes it chose, then code choice and scale refit
    /// alternate), `shrink` (that search without the least-squares refit). Default:
    /// `shrink` for --method gptq and baq with its GPTQ rounding (weighed by the Hessian:
    /// lower perplexity at every grid measured, for ×1.10 the time of GPTQ w4 g128 and
    /// ×1.25 of BAQ 3.206 g128), for FlexRound from GPTQ's start (flexround, baq
    /// --rounding flexround: 28.77 against 33.87 from min–max at w3 g128) and after
    /// `--transform ostquant` (its student trained on a searched range); `minmax`
    /// otherwise: rtn, baq --rounding rtn and FlexRound from RTN's start (data-free, the
    /// search loses on asymmetric grids and is 20–50× slower) and nupes (not measured with
    /// it).
    #[arg(long, value_enum)]
    pub range: Option<RangeKind>,
    /// Quantize lm_head too (rtn only).
    #[arg(long)]
    pub lm_head: bool,
    /// Zero-point convention: gptq (v1, most compatible) or gptq_v2.
    #[arg(long, default_value = "gptq")]
    pub checkpoint_format: String,
    /// Calibration text (plain text, or JSONL with a `text` field); default: the embedded
    /// WikiText-2 validation split.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration segments [default: 128; FlexRound (any --method with its rounding): 32,
    /// what its two activation streams and per-block forwards cost on a CPU].
    #[arg(long)]
    pub nsamples: Option<usize>,
    /// Tokens per calibration segment, capped at the model's context [default: 2048;
    /// FlexRound: 512, the length its training steps are affordable at on a CPU].
    #[arg(long)]
    pub seqlen: Option<usize>,
    /// Seed of the calibration window sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPTQ dampening, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// GPTQ: visit columns by descending Hessian diagonal (writes a non-trivial g_idx).
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ with --act-order: fix the group ranges up front so groups stay contiguous.
    #[arg(long)]
    pub static_groups: bool,
    /// GPTQ: after the solve, refit every scale by least squares for the chosen codes
    /// (minimising the layer's output error; zero points and codes stay).
    #[arg(long)]
    pub refit: bool,
    /// GPTQ lazy-update block size.
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// Compute every group's Hessian from the float block instead of quantizing
    /// [q,k,v] → [o] → [gate,up] → [down] in sequence.
    #[arg(long)]
    pub no_true_sequential: bool,
    /// FlexRound: the codes the learned division starts from: `gptq` (GPTQ's solution,
    /// with the GPTQ options above; the default) or `rtn` (the paper).
    #[arg(long, value_enum, default_value = "gptq")]
    pub init: FlexInit,
    /// FlexRound: train against each block's output (`block`, the paper) or each linear's
    /// output through its Hessian (`layer`, minutes instead of hours).
    #[arg(long, value_enum, default_value = "block")]
    pub reconstruct: Reconstruct,
    /// FlexRound: Adam steps per block (block mode) or per linear (layer mode); the
    /// paper uses 5000 per block.
    #[arg(long, default_value_t = 40)]
    pub iters: usize,
    /// FlexRound: calibration sequences per step (block mode); the paper uses 2.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// FlexRound: learning rate of the log-space factors (cosine-decayed to 0); the paper
    /// uses 3e-3 (Llama-2 7B 4-bit) down to 5e-4 for larger models.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// FlexRound: learn a per-input-column factor s4 as well.
    #[arg(long)]
    pub s4: bool,
    /// FlexRound block mode: hold the two activation streams and the float block's outputs
    /// in bf16 (half their memory; each step computes in f32).
    #[arg(long)]
    pub bf16_streams: bool,
    /// Largest safetensors shard in MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_shard_mib: u64,
    /// Replace OUT if it exists, and discard OUT's checkpoint (start over).
    #[arg(long)]
    pub overwrite: bool,
    /// Discard OUT's checkpoint from an earlier, unfinished run and start over (without
    /// it, a checkpoint made with the same settings is resumed, and one made with other
    /// settings is an error).
    #[arg(long)]
    pub fresh: bool,
    /// Run even when the memory estimate exceeds the memory available.
    #[arg(long)]
    pub force: bool,
    /// No progress bar or per-layer log.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    // validate everything cheap before any heavy work or any file is created
    let zeros = ZeroConvention::parse(&a.checkpoint_format)?;
    let recipe = match &a.recipe {
        Some(path) => Recipe::from_file(path)?,
        None => recipe_from_flags(&a)?,
    };
    recipe.validate()?;
    let gguf = matches!(
        recipe.allocation,
        AllocationSpec::Uniform {
            grid: GridSpec::Ggml { .. }
        } | AllocationSpec::BaqGgml(_)
    );
    // a recipe's grid says the format: a GGML grid writes GGUF, any other a folder
    ensure!(
        gguf || a.format != "gguf",
        "--format gguf writes GGML block types, and the recipe {} names none (its allocation \
         needs `\"grid\": {{\"kind\": \"ggml\", \"type\": ...}}` or `\"kind\": \"baq_ggml\"`)",
        a.recipe.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
    );
    ensure!(
        gguf || (a.ggml_type.is_none() && a.tokenizer_pre.is_none() && !a.no_vocab),
        "--type, --tokenizer-pre and --no-vocab are options of --format gguf"
    );
    let source = SourceModel::open(&a.model, a.revision.as_deref())?;
    // the GPTQ layout: said before the work, once, even with --quiet
    if let AllocationSpec::Uniform {
        grid: GridSpec::Uniform {
            group_size, sym, ..
        },
    } = &recipe.allocation
    {
        let linears = target_linears(&source.config, recipe.lm_head);
        let warnings = [
            group_size_warning(*group_size, &linears),
            checkpoint_format_warning(*sym, zeros),
        ];
        for w in warnings.into_iter().flatten() {
            eprintln!("warning: {w}");
        }
    }
    let checkpoint = checkpoint_dir(&a.output);
    // only calibrated runs checkpoint
    let _note = recipe.needs_calibration().then(|| {
        note_on_interrupt(format!(
            "the checkpoint {} is kept (if any block finished): the same command resumes it, \
         --fresh starts over",
            checkpoint.display()
        ))
    });
    let options = WriteOptions {
        run: RunOptions {
            progress: !a.quiet,
            checkpoint: Some(checkpoint),
            fresh: a.fresh || a.overwrite,
            force: a.force,
        },
        overwrite: a.overwrite,
        zeros,
        max_shard_bytes: a.max_shard_mib << 20,
        gguf_embedding: a.embedding_type,
        gguf_tokenizer_pre: a.tokenizer_pre.clone(),
        gguf_no_vocab: a.no_vocab,
    };
    let w = quantize_to(&a.output, &source, &recipe, &options)?;
    for warning in &w.warnings {
        eprintln!("warning: {warning}");
    }
    if let Some(g) = &w.gguf {
        super::print_fallback_notes(&g.fallbacks);
        println!("wrote        {} ({})", w.path.display(), human_bytes(w.bytes));
        if matches!(recipe.allocation, AllocationSpec::BaqGgml(_)) && g.types.len() > 1 {
            // the file's type is only the one holding the most weights; `types` lists all
            println!(
                "method       {} on a mix of GGML types (most weights in {})",
                w.method, g.linear_type
            );
        } else {
            println!("method       {} on {} blocks", w.method, g.linear_type);
        }
        println!("layers       {} quantized ({:.1} s)", w.layers, w.seconds);
        println!(
            "weights      {:.3} bits per quantized weight (blocks with their scales)",
            w.bits_per_weight
        );
        let types: Vec<String> = g.types.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
        println!("types        {}", types.join(", "));
        if let Some(m) = &g.measurement {
            println!(
                "measurement  {} (another budget: --measurement {0})",
                m.display()
            );
        }
        return Ok(());
    }
    let (shape, sym) = match &recipe.allocation {
        AllocationSpec::Uniform {
            grid: GridSpec::Ggml { ty },
        } => (format!("{ty} blocks"), true),
        AllocationSpec::BaqGgml(b) => (format!("{} bits over GGML types", b.bits), true),
        AllocationSpec::Baq(b) => (
            match b.codebook {
                None => format!("{} bits average, widths {:?}", b.bits, b.allowed_bits),
                Some(levels) => format!(
                    "{} bits average, widths {:?} on power codebooks ({levels:?} levels)",
                    b.bits, b.allowed_bits
                ),
            },
            b.sym || b.codebook.is_some(),
        ),
        AllocationSpec::Uniform {
            grid:
                GridSpec::Power {
                    bits,
                    group_size,
                    levels,
                    ..
                },
        } => (
            match group_size {
                GroupSize::PerChannel => format!("w{bits} per-channel {levels:?} levels"),
                GroupSize::Columns(g) => format!("w{bits}g{g} {levels:?} levels"),
            },
            true,
        ),
        AllocationSpec::Uniform {
            grid:
                GridSpec::Uniform {
                    bits,
                    group_size,
                    sym,
                    ..
                },
        } => (
            match group_size {
                GroupSize::PerChannel => format!("w{bits} per-channel"),
                GroupSize::Columns(g) => format!("w{bits}g{g}"),
            },
            *sym,
        ),
    };
    println!("wrote        {}", w.path.display());
    println!(
        "method       {} {shape} {}",
        w.method,
        if sym { "sym" } else { "asym" }
    );
    println!("layers       {} quantized ({:.1} s)", w.layers, w.seconds);
    println!(
        "weights      {:.3} bits per quantized weight (codes, scales, zeros, indices)",
        w.bits_per_weight
    );
    if let Some(code_bits) = w.code_bits {
        // the realized fractional rate (code bits alone), next to the stored figure above
        println!(
            "code bits    {code_bits:.3} per weight (mean column width; the rest is scales, zeros, permutation)"
        );
    }
    println!("size         {} on disk", human_bytes(w.bytes));
    Ok(())
}

/// The power grid's levels `--levels` names.
fn power_levels(l: LevelsKind) -> PowerLevels {
    match l {
        LevelsKind::Extended => PowerLevels::Extended,
        LevelsKind::All => PowerLevels::All,
        LevelsKind::Symmetric => PowerLevels::Symmetric,
    }
}

/// The recipe the flags describe (`--method` is the preset).
fn recipe_from_flags(a: &Args) -> Result<Recipe> {
    let gptq_spec = GptqSpec {
        damp: a.damp,
        block_size: a.block_size,
        act_order: a.act_order,
        static_groups: a.static_groups,
        refit: a.refit,
    };
    let learned = a.rounding == Some(RoundingKind::Learned);
    let flexround = RoundingSpec::FlexRound(FlexRoundSpec {
        learn_exponent: learned,
        init: a.init,
        reconstruct: a.reconstruct,
        iters: a.iters,
        batch: a.batch,
        lr: a.lr,
        s4: a.s4,
        seed: a.seed,
        gptq: gptq_spec,
        bf16_streams: a.bf16_streams,
    });
    let gptq = RoundingSpec::Gptq(gptq_spec);
    let gguf = a.format == "gguf";
    ensure!(
        a.allowed_types.is_none() || (gguf && a.method == Method::Baq),
        "--allowed-types is an option of --method baq with --format gguf"
    );
    if gguf && a.method == Method::Baq {
        ensure!(
            a.ggml_type.is_none(),
            "--method baq chooses each linear's GGML type under the --bits budget; drop --type"
        );
        ensure!(
            a.group_size.is_none() && !a.sym && a.range.is_none() && !a.code_bits,
            "--group-size, --sym, --range and --code-bits describe bitsmith's uniform grid; \
             with --format gguf the GGML types fix them (--bits counts blocks with their scales)"
        );
        ensure!(
            a.allocate == BaqScope::Layer,
            "BAQ over GGML types spends one budget over the model: drop --allocate"
        );
    } else if gguf {
        ensure!(
            matches!(
                a.method,
                Method::Rtn | Method::Gptq | Method::FlexRound | Method::Baq
            ),
            "--format gguf solves each linear on a GGML block type with --method rtn, gptq or \
             flexround, or chooses the types with --method baq"
        );
        ensure!(
            a.ggml_type.is_some_and(|t| !t.is_float()),
            "--format gguf needs --type, the GGML block type (Q4_K, Q5_K, Q6_K, Q3_K, Q2_K, \
             Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or IQ4_NL) or llama.cpp mix (Q4_K_M, …)"
        );
        ensure!(
            a.group_size.is_none() && !a.sym && a.range.is_none() && a.bits == 4.0,
            "--bits, --group-size, --sym and --range describe bitsmith's uniform grid; with \
             --format gguf the GGML type (--type) fixes all of them"
        );
    }
    ensure!(
        !(gguf && a.lm_head),
        "--lm-head is not supported with --format gguf yet"
    );
    let flexround_used = a.method == Method::FlexRound
        || (matches!(a.method, Method::Baq | Method::Nupes)
            && matches!(
                a.rounding,
                Some(RoundingKind::Flexround | RoundingKind::Learned)
            ));
    ensure!(
        !learned || a.method == Method::Nupes,
        "--rounding learned learns NUPES' exponent: it is an option of --method nupes (use \
         --rounding flexround for BAQ's widths)"
    );
    ensure!(
        flexround_used || !(a.s4 || a.bf16_streams),
        "--s4 and --bf16-streams are FlexRound options (--method flexround, or --method baq \
         or nupes with --rounding flexround)"
    );
    let (allocation, rounding) = match a.method {
        Method::Baq if gguf => {
            let rounding = match a.rounding {
                None | Some(RoundingKind::Gptq) => gptq,
                Some(RoundingKind::Rtn) => RoundingSpec::Rtn,
                Some(RoundingKind::Flexround) => flexround,
                Some(RoundingKind::Learned) => {
                    bail!("--rounding learned learns NUPES' exponent; BAQ over GGML types takes --rounding gptq, rtn or flexround")
                }
            };
            (
                AllocationSpec::BaqGgml(BaqGgmlSpec {
                    bits: a.bits,
                    types: a.allowed_types.clone().unwrap_or_else(default_ggml_types),
                    measurement: a.measurement.clone(),
                }),
                rounding,
            )
        }
        Method::Baq => (
            AllocationSpec::Baq(BaqSpec {
                bits: a.bits,
                allowed_bits: a.allowed_bits.clone(),
                theta: a.theta,
                code_bits: a.code_bits,
                scope: a.allocate,
                group_size: GroupSize::from_i64(a.group_size.unwrap_or(-1))?,
                sym: a.sym,
                range: range_kind(a).fit(),
                measurement: a.measurement.clone(),
                codebook: a.codebook.map(|_| power_levels(a.levels)),
            }),
            match a.rounding {
                None | Some(RoundingKind::Gptq) => gptq,
                Some(RoundingKind::Rtn) => RoundingSpec::Rtn,
                Some(RoundingKind::Flexround | RoundingKind::Learned) => flexround,
            },
        ),
        Method::Nupes => {
            let grid = GridSpec::Power {
                bits: whole_bits(a, "nupes")?,
                group_size: GroupSize::from_i64(a.group_size.unwrap_or(128))?,
                levels: power_levels(a.levels),
                exponent: a.exponent,
                range: match range_kind(a) {
                    RangeKind::FullRange => bail!(
                        "--range full-range is for symmetric uniform grids; NUPES' power grid \
                         takes minmax (each group's largest magnitude) or search"
                    ),
                    r => r.fit(),
                },
            };
            let rounding = match a.rounding {
                None | Some(RoundingKind::Rtn) => RoundingSpec::Rtn,
                Some(RoundingKind::Gptq) => gptq,
                Some(RoundingKind::Flexround | RoundingKind::Learned) => flexround,
            };
            (AllocationSpec::Uniform { grid }, rounding)
        }
        m => {
            if a.bits.fract() != 0.0 || !(0.0..=255.0).contains(&a.bits) {
                bail!("--bits {} must be a whole number for --method {} (fractional budgets need --method baq)", a.bits, m.name());
            }
            let grid = GridSpec::Uniform {
                bits: a.bits as u8,
                group_size: GroupSize::from_i64(a.group_size.unwrap_or(128))?,
                sym: a.sym,
                range: range_kind(a).fit(),
            };
            let rounding = match m {
                Method::Rtn => RoundingSpec::Rtn,
                Method::FlexRound => flexround,
                _ => gptq,
            };
            let grid = match a.ggml_type {
                Some(ty) if gguf => GridSpec::Ggml { ty },
                _ => grid,
            };
            (AllocationSpec::Uniform { grid }, rounding)
        }
    };
    if !matches!(a.method, Method::Nupes | Method::Baq) && a.rounding.is_some() {
        bail!("--rounding applies to --method baq and nupes; use --method rtn, gptq or flexround directly");
    }
    if a.codebook.is_some() && (a.method != Method::Baq || gguf) {
        bail!("--codebook puts BAQ's widths on power codebooks: an option of --method baq (bitsmith format); for one codebook per layer use --method nupes");
    }
    if a.method != Method::Nupes && a.exponent.is_some() {
        bail!("--exponent is an option of --method nupes");
    }
    if a.ost.any() && !a.transform.contains(&TransformKind::Ostquant) {
        bail!("the --ost-* and --no-online-hadamard flags apply to --transform ostquant");
    }
    let rotates_head = a
        .transform
        .iter()
        .any(|t| matches!(t, TransformKind::Hadamard | TransformKind::Ostquant));
    if a.f32_head && !rotates_head {
        bail!("--f32-head applies to --transform hadamard or ostquant (the transforms that rotate the head)");
    }
    if a.method != Method::Rtn && a.lm_head {
        bail!("--lm-head is only supported with --method rtn");
    }
    Ok(Recipe {
        transforms: a
            .transform
            .iter()
            .map(|t| match t {
                TransformKind::Hadamard => TransformSpec::Hadamard {
                    seed: a.transform_seed,
                    f32_head: a.f32_head,
                },
                TransformKind::Ostquant => TransformSpec::Ostquant(OstQuantSpec {
                    f32_head: a.f32_head,
                    ..a.ost.spec(a.transform_seed)
                }),
                TransformKind::DownHadamard => TransformSpec::DownHadamard,
            })
            .collect(),
        allocation,
        rounding,
        calibration: CalibrationSpec {
            text: a.calib.clone(),
            nsamples: a.nsamples.unwrap_or(if flexround_used { 32 } else { 128 }),
            seqlen: a.seqlen.unwrap_or(if flexround_used { 512 } else { 2048 }),
            seed: a.seed,
            true_sequential: !a.no_true_sequential,
        },
        lm_head: a.lm_head,
    })
}

/// `--bits` as a whole number of bits.
fn whole_bits(a: &Args, method: &str) -> Result<u8> {
    if a.bits.fract() != 0.0 || !(0.0..=255.0).contains(&a.bits) {
        bail!(
            "--bits {} must be a whole number for --method {method}",
            a.bits
        );
    }
    Ok(a.bits as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: Args,
    }

    fn range_of(flags: &[&str]) -> RangeKind {
        let argv = [&["bitsmith", "MODEL", "-o", "OUT"], flags].concat();
        range_kind(&Wrap::try_parse_from(argv).unwrap().args)
    }

    fn recipe_of(flags: &[&str]) -> Result<Recipe> {
        let argv = [&["bitsmith", "MODEL", "-o", "OUT"], flags].concat();
        recipe_from_flags(&Wrap::try_parse_from(argv).unwrap().args)
    }

    /// Every flag that shapes the recipe conflicts with `--recipe` (which holds them all):
    /// a new flag fails here until it is either listed there or named below as one that
    /// does not change what the recipe computes.
    #[test]
    fn every_recipe_flag_conflicts_with_recipe() {
        use clap::CommandFactory;
        let cmd = Wrap::command();
        let recipe = cmd
            .get_arguments()
            .find(|a| a.get_id() == "recipe")
            .unwrap();
        let conflicting: Vec<&str> = cmd
            .get_arg_conflicts_with(recipe)
            .iter()
            .map(|a| a.get_id().as_str())
            .collect();
        let mut free: Vec<&str> = cmd
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| *id != "recipe" && !conflicting.contains(id))
            .collect();
        free.sort_unstable();
        let output_and_run = [
            "embedding_type", "fresh", "force", "format",
            "max_shard_mib", "model", "no_vocab", "output", "overwrite", "quiet", "revision",
            "tokenizer_pre", "checkpoint_format",
        ];
        let mut expected = output_and_run.to_vec();
        expected.sort_unstable();
        assert_eq!(free, expected, "flags --recipe does not refuse");
    }

    #[test]
    fn flexround_solves_on_every_ggml_block_type_and_mix() {
        let types = ["Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q2_K", "IQ4_NL", "Q4_K_M", "Q3_K_S"];
        for ty in types {
            let args = ["--method", "flexround", "--format", "gguf", "--type", ty];
            let r = recipe_of(&args).unwrap();
            assert!(matches!(r.rounding, RoundingSpec::FlexRound(_)));
            r.validate().unwrap();
        }
    }

    #[test]
    fn nupes_takes_flexround_rounding_with_flexrounds_calibration() {
        let r = recipe_of(&["--method", "nupes", "--bits", "3", "--rounding", "flexround"]).unwrap();
        assert_eq!(r.method_name(), "nupes+flexround");
        assert!(matches!(r.rounding, RoundingSpec::FlexRound(_)));
        assert_eq!((r.calibration.nsamples, r.calibration.seqlen), (32, 512));
        r.validate().unwrap();
        let with_s4 = ["--method", "nupes", "--rounding", "flexround", "--s4"];
        assert!(recipe_of(&with_s4).is_ok());
        assert!(recipe_of(&["--method", "nupes", "--s4"]).is_err());
        let learned = recipe_of(&["--method", "nupes", "--rounding", "learned"]).unwrap();
        assert_eq!(learned.method_name(), "nupes+learned");
        learned.validate().unwrap();
        let baq = ["--method", "baq", "--bits", "3.2", "--rounding", "learned"];
        assert!(recipe_of(&baq).is_err());
    }

    #[test]
    fn range_defaults_to_the_search_for_gptq() {
        assert_eq!(range_of(&["--method", "gptq"]), RangeKind::Shrink);
        assert_eq!(
            range_of(&["--method", "baq", "--bits", "3.2"]),
            RangeKind::Shrink
        );
        assert_eq!(
            range_of(&["--method", "baq", "--bits", "3.2", "--rounding", "gptq"]),
            RangeKind::Shrink
        );
        assert_eq!(
            range_of(&[
                "--method",
                "baq",
                "--bits",
                "3.2",
                "--rounding",
                "flexround"
            ]),
            RangeKind::Shrink
        );
        assert_eq!(
            range_of(&["--method", "baq", "--bits", "3.2", "--rounding", "rtn"]),
            RangeKind::Minmax
        );
        assert_eq!(range_of(&[]), RangeKind::Minmax);
        assert_eq!(range_of(&["--method", "flexround"]), RangeKind::Shrink);
        assert_eq!(
            range_of(&["--method", "flexround", "--init", "rtn"]),
            RangeKind::Minmax
        );
        assert_eq!(range_of(&["--method", "nupes"]), RangeKind::Minmax);
        assert_eq!(range_of(&["--transform", "ostquant"]), RangeKind::Shrink);
        assert_eq!(
            range_of(&["--method", "gptq", "--range", "minmax"]),
            RangeKind::Minmax
        );
    }
}
