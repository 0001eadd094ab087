use crate::infer::{
    Engine, FinishReason, GenerateOptions, LoadOptions, Message, Prompt, SamplingParams,
};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::ops::ControlFlow;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Where and how to load the model (shared by `generate` and `bench`).
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder (float or packed), Hugging Face repo id or `.gguf` file (decoded once
    /// into bitsmith's cache).
    pub model: String,
    /// Hub revision (branch, tag or commit) when MODEL is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Compute dtype: f32 (default), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub packed: super::WeightArgs,
}

impl ModelArgs {
    pub(crate) fn load(&self) -> Result<(Engine, f64)> {
        let opts = LoadOptions {
            revision: self.revision.clone(),
            dtype: crate::parse_dtype(&self.dtype)?,
            weights: self.packed.mode()?,
            device: self.packed.device()?,
        };
        let t = Instant::now();
        let engine = Engine::load(&self.model, &opts)?;
        Ok((engine, t.elapsed().as_secs_f64()))
    }
}

#[derive(clap::Args)]
#[command(
    long_about = "Generate text with a KV cache, streaming it to stdout; a timing summary goes to \
stderr. With a chat template (tokenizer_config.json `chat_template`, chat_template.jinja) the \
prompt is sent as a user turn (--chat, the default when the model has one); --raw tokenizes \
the prompt as it is."
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (a user message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (default when it has one).
    #[arg(long, conflicts_with = "raw")]
    pub chat: bool,
    /// Use the prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message for --chat.
    #[arg(long, conflicts_with = "raw")]
    pub system: Option<String>,
    /// Most tokens to generate (1 or more).
    #[arg(long, default_value_t = 128, value_parser = super::ranges::positive, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Sampling temperature, ≥ 0; 0 = greedy.
    #[arg(long, default_value_t = 0.7, value_parser = super::ranges::temperature, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, value_parser = super::ranges::top_p, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens (1 or more).
    #[arg(long, value_parser = super::ranges::positive, allow_negative_numbers = true)]
    pub top_k: Option<usize>,
    /// Penalty on tokens already in the context, > 0 (1 = off; 1.1–1.3 is typical).
    #[arg(long, default_value_t = 1.0, value_parser = super::ranges::penalty, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Random seed (default: from the clock; printed in the summary).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

pub fn run(a: Args) -> Result<()> {
    let seed = a.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            seed,
        },
        stop_strings: a.stop.clone(),
        ..GenerateOptions::default()
    };
    // bad options fail before the model is loaded
    opts.sampling.validate()?;
    let (engine, load_s) = a.model.load()?;
    let has_template = engine.chat_template().is_some();
    let use_chat = !a.raw && (a.chat || a.system.is_some() || has_template);
    if use_chat && !has_template {
        bail!(
            "model `{}` has no chat template (needed by --chat/--system); use --raw",
            a.model.model
        );
    }
    let prompt = if use_chat {
        let mut turns: Vec<Message> = a.system.iter().map(|s| Message::system(s)).collect();
        turns.push(Message::user(&a.prompt));
        Prompt::Chat(turns)
    } else {
        Prompt::Text(a.prompt.clone())
    };
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let g = engine.generate(&prompt, &opts, |ev| {
        match stdout
            .write_all(ev.text.as_bytes())
            .and_then(|_| stdout.flush())
        {
            Ok(()) => ControlFlow::Continue(()),
            // stdout closed (e.g. piped into `head`): stop generating
            Err(e) => {
                write_error = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
        return Ok(());
    }
    let _ = writeln!(stdout);
    let finish = match &g.finish {
        FinishReason::StopToken(t) => format!("stop token {t}"),
        FinishReason::StopString(s) => format!("stop string {s:?}"),
        FinishReason::MaxTokens => "max tokens".into(),
        FinishReason::ContextFull => "context full".into(),
        FinishReason::Cancelled => "cancelled".into(),
    };
    eprintln!(
        "\n[{}; {} prompt tokens, prefill {:.1} tok/s ({:.2} s); {} generated, decode {:.1} tok/s; finish: {finish}; seed {seed}; load {load_s:.1} s]",
        if use_chat { "chat" } else { "raw" },
        g.prompt_tokens,
        g.prefill_tokens_per_second(),
        g.prefill_time.as_secs_f64(),
        g.tokens.len(),
        g.decode_tokens_per_second(),
    );
    Ok(())
}
