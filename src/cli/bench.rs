use super::generate::ModelArgs;
use crate::cli::human_bytes;
use crate::infer::{bench, BenchOptions};
use anyhow::Result;

#[derive(clap::Args)]
#[command(
    long_about = "Serving throughput: prefill of a --prompt-len token prompt (embedded WikiText-2 \
text) in each of --batch rows, then --gen greedy tokens decoded one step at a time (KV cache), and the peak \
resident memory of the process (VmHWM, which counts the memory-mapped weights once read). One untimed \
prefill of the same shape and one decode step run first, as llama-bench warms up before its own timings."
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens prefilled per sequence (1 or more).
    #[arg(long, default_value_t = 512, value_parser = super::ranges::positive, allow_negative_numbers = true)]
    pub prompt_len: usize,
    /// Tokens decoded per sequence (1 or more).
    #[arg(long, default_value_t = 64, value_parser = super::ranges::positive, allow_negative_numbers = true)]
    pub gen: usize,
    /// Sequences decoded together (the same prompt in each); tokens/s count all of them.
    #[arg(long, default_value_t = 1, value_parser = super::ranges::positive, allow_negative_numbers = true)]
    pub batch: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (engine, load_s) = a.model.load()?;
    let r = bench(
        &engine,
        &BenchOptions {
            prompt_len: a.prompt_len,
            gen: a.gen,
            batch: a.batch,
        },
    )?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = engine.files().source.clone().into();
        v["dtype"] = a.model.dtype.clone().into();
        v["load_seconds"] = load_s.into();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let rss = r.peak_rss_bytes.map_or("unknown".to_string(), human_bytes);
    println!("model     {} ({})", engine.files().source, a.model.dtype);
    println!(
        "prefill   {:.1} tok/s ({} × {} tokens in {:.2} s)",
        r.prefill_tokens_per_second, r.batch, r.prompt_tokens, r.prefill_seconds
    );
    println!(
        "decode    {:.1} tok/s ({} × {} tokens in {:.2} s, batch {})",
        r.decode_tokens_per_second, r.batch, r.decode_tokens, r.decode_seconds, r.batch
    );
    println!("kv cache  {}", human_bytes(r.kv_cache_bytes as u64));
    println!("peak RSS  {rss} (load {load_s:.1} s)");
    if let Some(k) = &r.packed_kernel {
        println!("kernels   {k}");
    }
    if let Some(k) = r.bf16_gemm {
        println!("bf16 GEMM {k} (BITSMITH_BF16_GEMM=dot|widen forces one)");
    }
    Ok(())
}
