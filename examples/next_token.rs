//! Load a float or packed model and print the most likely next tokens for a prompt.
//!
//!     cargo run --release --example next_token -- MODEL "The capital of France is"

use anyhow::{anyhow, Result};
use bitsmith::{load_tokenizer, resolve_model};
use candle_core::{DType, Device, Tensor};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model_id, prompt) = match args.as_slice() {
        [_, m, p] => (m.as_str(), p.as_str()),
        _ => return Err(anyhow!("usage: next_token MODEL PROMPT")),
    };
    let files = resolve_model(model_id, None)?; // folder or hub repo id
    let model = bitsmith::load_model(&files, DType::F32, &Device::Cpu)?; // float or packed
    let tokenizer = load_tokenizer(&files)?;
    let ids = tokenizer
        .encode(prompt, true)
        .map_err(|e| anyhow!("{e}"))?
        .get_ids()
        .to_vec();
    let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu)?;
    let logits: Vec<f32> = model
        .forward(&input)?
        .squeeze(0)?
        .get(ids.len() - 1)?
        .to_vec1()?;
    let mut ranked: Vec<(usize, f32)> = logits.into_iter().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (id, logit) in ranked.into_iter().take(5) {
        let text = tokenizer
            .decode(&[id as u32], false)
            .map_err(|e| anyhow!("{e}"))?;
        println!("{logit:8.3}  {id:6}  {text:?}");
    }
    Ok(())
}
