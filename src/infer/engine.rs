//! [`Engine`]: a loaded model with its tokenizer, chat template and stop tokens, and the
//! batched forward over a KV cache.

use super::chat::{special_token, ChatTemplate, Message};
use super::error::{ServeError, ServeResult};
use super::load::{attach_host_kernels, load_model_with, WeightMode};
use super::Route;
use crate::loader::{load_tokenizer, ModelFiles};
use crate::pack::gguf::resolve_model_or_gguf;
use crate::model::{CausalLm, KvCache, LogitsFor};
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tokenizers::Tokenizer;

/// Where and how to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Hub revision (branch, tag or commit) when the model is a repo id.
    pub revision: Option<String>,
    pub device: Device,
    /// Compute dtype: F32, BF16 or F16.
    pub dtype: DType,
    /// For a packed model: keep the weights packed and run them on packed kernels (CPU
    /// only; the default), or dequantize them on load. Float models ignore it.
    pub weights: WeightMode,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            revision: None,
            device: Device::Cpu,
            dtype: DType::F32,
            weights: WeightMode::Packed(Route::Auto),
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's own special tokens (e.g. BOS).
    Text(String),
    /// Chat turns, rendered with the model's chat template and the assistant header.
    Chat(Vec<Message>),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

/// A model ready for serving.
pub struct Engine {
    model: CausalLm,
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
    eos_ids: Vec<u32>,
    files: ModelFiles,
}

impl Engine {
    /// Load `model` (a folder or a Hugging Face repo id; float or packed) onto a device.
    pub fn load(model: &str, opts: &LoadOptions) -> ServeResult<Self> {
        let load = || -> Result<(ModelFiles, CausalLm)> {
            let files = resolve_model_or_gguf(model, opts.revision.as_deref())?;
            let lm = load_model_with(&files, opts.dtype, &opts.device, opts.weights)?;
            Ok((files, lm))
        };
        let (files, lm) = load().map_err(|source| ServeError::Load {
            model: model.to_string(),
            source,
        })?;
        Self::from_model(files, lm)
    }

    /// An engine around an already loaded model (e.g. one quantized in memory).
    pub fn from_model(files: ModelFiles, mut model: CausalLm) -> ServeResult<Self> {
        attach_host_kernels(&mut model);
        let side_files = || -> Result<_> {
            let tokenizer = load_tokenizer(&files)?;
            let chat = ChatTemplate::from_files(&files)?;
            let eos_ids = eos_token_ids(&files, &tokenizer)?;
            Ok((tokenizer, chat, eos_ids))
        };
        let (tokenizer, chat, eos_ids) = side_files().map_err(|source| ServeError::Load {
            model: files.source.clone(),
            source,
        })?;
        Ok(Self {
            model,
            tokenizer,
            chat,
            eos_ids,
            files,
        })
    }

    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Token ids that end a generation: `eos_token_id` of generation_config.json (one or
    /// a list) or config.json, and tokenizer_config.json's `eos_token`.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// An empty KV cache with room for `reserve` positions per sequence.
    pub fn new_cache(&self, reserve: usize) -> KvCache {
        self.model.new_cache(reserve)
    }

    /// Run new tokens through the model after what `cache` holds and extend it. All
    /// sequences of the batch have the same number of new tokens (a prompt prefill, or one
    /// token each when decoding) and the same history. Returns the logits of each
    /// sequence's last position, `[batch, vocab]` in f32.
    pub fn forward(&self, tokens: &[Vec<u32>], cache: &mut KvCache) -> ServeResult<Tensor> {
        let b = tokens.len();
        if b == 0 {
            return Err(ServeError::EmptyBatch);
        }
        let s = tokens[0].len();
        if tokens.iter().any(|t| t.len() != s) {
            return Err(ServeError::RaggedBatch {
                lengths: tokens.iter().map(Vec::len).collect(),
            });
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = tokens.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ServeError::TokenOutOfVocabulary { id, vocab });
        }
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, s), self.model.device())?;
        let logits = self.model.forward_cached(&ids, cache, LogitsFor::Last)?;
        Ok(logits.squeeze(1)?.to_dtype(DType::F32)?)
    }

    /// Token ids of a prompt.
    pub fn encode(&self, prompt: &Prompt) -> ServeResult<Vec<u32>> {
        let (text, special) = match prompt {
            Prompt::Tokens(ids) => return Ok(ids.clone()),
            Prompt::Text(t) => (t.clone(), true),
            Prompt::Chat(messages) => (self.render_chat(messages)?, false),
        };
        // a rendered template already spells out its special tokens
        Ok(self
            .tokenizer
            .encode(text.as_str(), special)
            .map_err(|e| ServeError::BadPrompt(anyhow!("tokenizing the prompt: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// The chat template applied to `messages`, ending with the assistant header.
    pub fn render_chat(&self, messages: &[Message]) -> ServeResult<String> {
        let t = self
            .chat
            .as_ref()
            .ok_or_else(|| ServeError::NoChatTemplate {
                model: self.files.source.clone(),
            })?;
        t.render(messages, true).map_err(ServeError::BadPrompt)
    }

    /// Text of token ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> ServeResult<String> {
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ServeError::TokenOutOfVocabulary { id, vocab });
        }
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ServeError::Internal(anyhow!("decoding tokens: {e}")))
    }
}

fn eos_token_ids(files: &ModelFiles, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let json = |path: &std::path::Path| -> Result<Value> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    };
    let extra = |name: &str| files.extras.iter().find(|(n, _)| n == name).map(|(_, p)| p);
    let ids_of = |v: Option<&Value>| -> Vec<u32> {
        match v {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut ids = match extra("generation_config.json") {
        Some(p) => ids_of(json(p)?.get("eos_token_id")),
        None => Vec::new(),
    };
    if ids.is_empty() {
        ids = ids_of(json(&files.config)?.get("eos_token_id"));
    }
    if let Some(p) = extra("tokenizer_config.json") {
        let eos = json(p)?.get("eos_token").and_then(special_token);
        ids.extend(eos.and_then(|t| tokenizer.token_to_id(&t)));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
