//! Command-line interface: argument parsing and printing only; every command is a thin
//! call into the library.

mod bench;
mod compare;
mod convert;
mod export;
mod generate;
mod inspect;
mod inspect_gguf;
mod ost_flags;
mod ppl;
mod quantize;
mod ranges;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bitsmith",
    version,
    about = "Post-training quantization of Llama-family LLMs",
    long_about = "Post-training quantization of Llama-family LLMs (Llama 2/3, Mistral, Qwen2, SmolLM).\n\n\
MODEL arguments are a local model folder, a Hugging Face repo id (org/name) or a `llama` GGUF \
file (`*.gguf`). Repo ids are resolved through the hub cache (HF_HOME); with HF_HUB_OFFLINE=1 \
only the cache is used; HF_TOKEN authenticates downloads. A GGUF file is decoded once to exact \
f32 weights in $BITSMITH_CACHE/gguf (default ~/.cache/bitsmith/gguf) and that folder is reused \
while the file is unchanged; `bitsmith convert` writes such a folder where you choose."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize a model and write a packed model folder (GPTQ layout, or bitsmith's mixed and
    /// codebook layouts) or a GGUF file solved on a GGML block type.
    Quantize(Box<quantize::Args>),
    /// Measure perplexity (WikiText-2 protocol) of a float or packed model.
    Ppl(ppl::Args),
    /// Show a model's architecture, parameters, tensors and quantization.
    Inspect(inspect::Args),
    /// Generate text from a prompt (KV cache, streaming).
    Generate(generate::Args),
    /// Measure prefill and decode tokens/s and peak memory.
    Bench(bench::Args),
    /// Compare models against a base: table (markdown, JSON) and plots.
    Compare(compare::Args),
    /// Export a model to another runtime's format (GGUF for llama.cpp).
    Export(export::Args),
    /// Convert a GGUF file to a float model folder (weights decoded by candle).
    Convert(convert::Args),
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    pin_thread_count();
    let cli = Cli::parse();
    // SIGINT/SIGTERM/SIGHUP: remove half-written output folders, exit 128 + signal
    if let Err(e) = crate::signals::install() {
        eprintln!("warning: interrupts will not clean up the output folder ({e:#})");
    }
    let result = match cli.command {
        Command::Quantize(a) => quantize::run(*a),
        Command::Ppl(a) => ppl::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Export(a) => export::run(a),
        Command::Convert(a) => convert::run(a),
    };
    if crate::signals::interrupted() {
        // the interrupt handler is removing the output and will exit with 128 + signal;
        // an error met meanwhile (its folder vanished) is not the story to tell
        loop {
            std::thread::park();
        }
    }
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// candle asks the OS for the core count on every CPU matmul (reading /proc/cpuinfo)
/// unless `RAYON_NUM_THREADS` is set: decode (many tiny matmuls) ran at ~19 tok/s on the
/// fixture with the lookups and ~45 tok/s without.
/// Setting it to the count candle would find keeps its choice and skips the lookups; done
/// first thing, before any thread exists that could read the environment concurrently.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Print GGUF type fallbacks (`tensor: why`) as notes on stderr, one per reason.
pub(crate) fn print_fallback_notes(fallbacks: &[String]) {
    for line in fallback_notes(fallbacks) {
        eprintln!("note: {line}");
    }
}

/// One line per distinct reason, with how many tensors it covers and the first of them
/// (the full list is in the JSON report).
fn fallback_notes(fallbacks: &[String]) -> Vec<String> {
    let mut reasons: Vec<(&str, usize, &str)> = vec![];
    for f in fallbacks {
        let (tensor, why) = f.split_once(": ").unwrap_or(("", f));
        match reasons.iter_mut().find(|(w, _, _)| *w == why) {
            Some(r) => r.1 += 1,
            None => reasons.push((why, 1, tensor)),
        }
    }
    reasons
        .into_iter()
        .map(|(why, count, first)| match count {
            1 => format!("{first}: {why}"),
            _ => format!("{count} tensors ({first}, …): {why}"),
        })
        .collect()
}

#[cfg(test)]
mod fallback_note_tests {
    #[test]
    fn one_line_per_reason_with_its_count() {
        let lines = super::fallback_notes(&[
            "a: 576 columns, written as Q5_0".into(),
            "b: 576 columns, written as Q5_0".into(),
            "c: 96 columns, written as F16".into(),
        ]);
        assert_eq!(
            lines,
            [
                "2 tensors (a, …): 576 columns, written as Q5_0",
                "c: 96 columns, written as F16"
            ]
        );
    }
}

/// Human-readable byte counts.
pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Where the model runs and how a packed model's linears are held (`ppl`, `compare`,
/// `generate`, `bench`).
#[derive(clap::Args)]
pub struct WeightArgs {
    /// How a packed model's quantized linears are held: `packed` (the default: codes stay
    /// packed in memory and run on bitsmith's CPU kernels) or `dequantized` (expanded to
    /// dense weights on load). A float model computed in bf16 runs its linears on
    /// bitsmith's bf16 kernels under `packed` and on candle's matmul under `dequantized`;
    /// otherwise no effect on a float model.
    #[arg(long, default_value = "packed", value_parser = ["packed", "dequantized"])]
    pub weights: String,
    /// Packed kernels: `auto` (bitsmith's exact kernels), `bitsmith`, `int8` (bitsmith's
    /// kernels with activations quantized to int8 per token and 32 columns above batch
    /// 8, as llama.cpp does: integer dot products, AVX-512 VNNI or AVX-VNNI where the CPU
    /// has it, for prefill and `ppl`; decode stays exact; CPU only; uniform and mixed-width
    /// layers), or `ggml` (candle's
    /// Q4_0/Q8_0/Q4_1 blocks where a layer maps onto one exactly; activations are
    /// quantized to 8 bits).
    #[arg(long, default_value = "auto")]
    pub kernels: String,
    /// Where to run: `cpu` (the default), `cuda`, `cuda:N`, `metal` or `metal:N`. A GPU
    /// needs a build with the `cuda` or `metal` feature; packed layers then run on
    /// bitsmith's GPU kernels (the GGML route stays on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl WeightArgs {
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        Ok(crate::parse_device(&self.device)?)
    }

    /// Refuses a bad `--device` before any other work (the device opens at load).
    pub fn check_device(&self) -> anyhow::Result<()> {
        Ok(crate::check_device(&self.device)?)
    }

    pub fn mode(&self) -> anyhow::Result<crate::infer::WeightMode> {
        Ok(match self.weights.as_str() {
            "dequantized" => crate::infer::WeightMode::Dequantized,
            _ => crate::infer::WeightMode::Packed(self.kernels.parse()?),
        })
    }
}
