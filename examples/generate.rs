//! Load a model (float or packed; folder or hub repo id) and stream a reply to a prompt,
//! the way an inference server embeds bitsmith.
//!
//!     cargo run --release --example generate -- MODEL "What is the capital of France?"
//!
//! The prompt goes through the model's chat template when it has one.

use anyhow::{anyhow, Result};
use bitsmith::{Engine, GenerateOptions, LoadOptions, Message, Prompt, SamplingParams};
use std::io::Write;
use std::ops::ControlFlow;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, prompt] = args.as_slice() else {
        return Err(anyhow!("usage: generate MODEL PROMPT"));
    };
    let engine = Engine::load(model, &LoadOptions::default())?; // CPU, f32
    let prompt = match engine.chat_template() {
        Some(_) => Prompt::Chat(vec![Message::user(prompt)]),
        None => Prompt::Text(prompt.clone()),
    };
    let opts = GenerateOptions {
        max_tokens: 64,
        sampling: SamplingParams {
            temperature: 0.7,
            top_p: Some(0.9),
            seed: 1,
            ..SamplingParams::default()
        },
        ..GenerateOptions::default()
    };
    let done = engine.generate(&prompt, &opts, |event| {
        print!("{}", event.text);
        let _ = std::io::stdout().flush();
        ControlFlow::Continue(())
    })?;
    println!();
    eprintln!(
        "{:?}: {} tokens, prefill {:.0} tok/s, decode {:.1} tok/s",
        done.finish,
        done.tokens.len(),
        done.prefill_tokens_per_second(),
        done.decode_tokens_per_second()
    );
    Ok(())
}
