//! The serving API's errors. What the caller got wrong (a request to fix: an empty or ragged
//! batch, a token outside the vocabulary, a prompt longer than the context, sampling
//! options out of range, a chat prompt for a model without a template) is told apart from a
//! model that cannot be loaded and from failures inside, so a server can answer "bad
//! request", "bad model" or "internal error" without reading messages.

use crate::error::{kind_of, ErrorKind};

/// An error of [`Engine`](super::Engine)'s calls.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model could not be resolved or loaded: missing or unreadable files, an
    /// architecture or format bitsmith does not read.
    #[error("loading model `{model}`: {source:#}")]
    Load {
        model: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("forward of an empty batch")]
    EmptyBatch,
    #[error("sequences of one forward must have the same length (got {lengths:?})")]
    RaggedBatch { lengths: Vec<usize> },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocabulary { id: u32, vocab: usize },
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens; the model's context is {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("invalid sampling options: {reason}")]
    InvalidSampling { reason: String },
    #[error(
        "model `{model}` has no chat template (no chat_template in tokenizer_config.json, \
         chat_template.jinja or chat_template.json); use a raw prompt"
    )]
    NoChatTemplate { model: String },
    /// The chat template failed on these messages, or the tokenizer on this text.
    #[error("{0:#}")]
    BadPrompt(anyhow::Error),
    /// A failure inside bitsmith or candle (a kernel, a tensor operation); not the
    /// caller's doing.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ServeError {
    /// Whether the request itself was wrong (fix it and retry), as opposed to the model
    /// ([`ServeError::Load`]) or an internal failure.
    pub fn is_caller_error(&self) -> bool {
        !matches!(self, Self::Load { .. } | Self::Internal(_))
    }

    /// Why a [`ServeError::Load`] failed: [`ErrorKind::ModelNotFound`] for a model that
    /// does not resolve (a server's 404), [`ErrorKind::InvalidModel`] for files bitsmith
    /// cannot use, [`ErrorKind::InvalidOption`] for load options this build cannot run;
    /// `None` for the other variants.
    pub fn load_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Load { source, .. } => Some(kind_of(source)),
            _ => None,
        }
    }
}

/// The engine checks a request before the model sees it, so what the model still rejects
/// is not the request's doing.
impl From<crate::Error> for ServeError {
    fn from(e: crate::Error) -> Self {
        Self::Internal(e.into())
    }
}

impl From<candle_core::Error> for ServeError {
    fn from(e: candle_core::Error) -> Self {
        Self::Internal(e.into())
    }
}

pub type ServeResult<T> = std::result::Result<T, ServeError>;
