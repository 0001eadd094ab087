//! The library's errors. Each says what kind of failure it is, so a caller (a server, a
//! batch job) can tell a bad request or a bad model from a failure inside bitsmith without
//! reading messages, and still print the whole story (`{e}` is the full chain of context).
//!
//! Inside the crate, errors are `anyhow` chains with context; where bitsmith finds the
//! caller's input wrong it marks the error with its [`ErrorKind`] ([`tagged`],
//! [`ResultExt::kind`]). The public functions return [`Error`], which takes the outermost
//! mark of the chain; an unmarked chain is [`ErrorKind::Internal`].

use std::fmt;

/// What went wrong, as a caller acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The model does not resolve: no such folder, not a `org/name` repo id, not in the hub
    /// cache while offline, or the hub refused or could not be reached.
    ModelNotFound,
    /// The model's files are there but bitsmith cannot use them: a missing or malformed
    /// config.json, weight shard or tokenizer, a missing tensor, or an architecture, dtype
    /// or quantization format bitsmith does not read.
    InvalidModel,
    /// Another input the caller named is unreadable or malformed: calibration or
    /// evaluation text, a recipe file, a GGUF file to convert, a saved logits file.
    InvalidInput,
    /// An option or recipe value is out of range or not a combination bitsmith runs (bits,
    /// group size, budget, a grid a method does not take, a device not built in).
    InvalidOption,
    /// The output cannot be written: the folder exists (without overwrite), is not
    /// writable, or the disk is full. Nothing half-written is left behind.
    Output,
    /// A failure inside bitsmith or candle (a kernel, a tensor operation): not the
    /// caller's doing.
    Internal,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            Self::ModelNotFound => "model not found",
            Self::InvalidModel => "invalid model",
            Self::InvalidInput => "invalid input",
            Self::InvalidOption => "invalid option",
            Self::Output => "cannot write output",
            Self::Internal => "internal error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// An error of bitsmith's public functions: its [`ErrorKind`] and the chain of context.
pub struct Error {
    kind: ErrorKind,
    chain: anyhow::Error,
}

/// `Result` with bitsmith's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the caller can fix it (the model, an input, an option or the output
    /// place), as opposed to a failure inside bitsmith.
    pub fn is_caller_error(&self) -> bool {
        self.kind != ErrorKind::Internal
    }

    /// The messages from the outermost context to the root cause.
    pub fn messages(&self) -> impl Iterator<Item = String> + '_ {
        self.chain.chain().map(|e| e.to_string())
    }
}

/// The whole chain, outermost first (`a: b: c`), as `anyhow`'s `{:#}` prints it.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.chain)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?}): {:#}", self.kind, self.kind, self.chain)
    }
}

/// Display already holds the chain, so there is no separate source.
impl std::error::Error for Error {}

/// The outermost mark in the chain decides the kind; none means internal.
impl From<anyhow::Error> for Error {
    fn from(chain: anyhow::Error) -> Self {
        let kind = kind_of(&chain);
        Self { kind, chain }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        anyhow::Error::from(e).into()
    }
}

/// The kind an error chain carries: its outermost [`Marked`] or [`Error`], else
/// [`ErrorKind::Internal`].
pub(crate) fn kind_of(chain: &anyhow::Error) -> ErrorKind {
    chain
        .chain()
        .find_map(|e| {
            e.downcast_ref::<Marked>()
                .map(|m| m.kind)
                .or_else(|| e.downcast_ref::<Error>().map(Error::kind))
        })
        .unwrap_or(ErrorKind::Internal)
}

/// A link of an `anyhow` chain marked with its kind: it shows and sources exactly what it
/// wraps, so marking adds no line to the message.
#[derive(Debug)]
pub(crate) struct Marked {
    kind: ErrorKind,
    inner: anyhow::Error,
}

impl fmt::Display for Marked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for Marked {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

/// A new error of `kind` with `message` (`bail!`'s counterpart for the caller's mistakes).
pub(crate) fn tagged(kind: ErrorKind, message: impl fmt::Display) -> anyhow::Error {
    mark(kind, anyhow::anyhow!("{message}"))
}

fn mark(kind: ErrorKind, inner: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Marked { kind, inner })
}

/// `return Err(tagged(ErrorKind::$kind, format!(...)))`.
macro_rules! fail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::tagged($crate::error::ErrorKind::$kind, format!($($arg)*)).into())
    };
}
pub(crate) use fail;

/// Marks a result's error with a kind (unless an inner mark already says more: the
/// outermost mark wins, so mark where the meaning is known).
pub(crate) trait ResultExt<T> {
    fn kind(self, kind: ErrorKind) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> ResultExt<T> for std::result::Result<T, E> {
    fn kind(self, kind: ErrorKind) -> anyhow::Result<T> {
        self.map_err(|e| mark(kind, e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_outermost_mark_decides_and_the_message_keeps_every_link() {
        let root: anyhow::Result<()> = Err(tagged(ErrorKind::InvalidModel, "bad config"));
        let wrapped = root
            .context("loading `m`")
            .kind(ErrorKind::ModelNotFound)
            .context("opening");
        let e = Error::from(wrapped.unwrap_err());
        assert_eq!(e.kind(), ErrorKind::ModelNotFound);
        assert_eq!(e.to_string(), "opening: loading `m`: bad config");
        assert!(e.is_caller_error());
    }

    #[test]
    fn an_unmarked_chain_is_internal_and_a_converted_error_keeps_its_kind() {
        let plain = Error::from(anyhow::anyhow!("kernel failed"));
        assert_eq!(plain.kind(), ErrorKind::Internal);
        assert!(!plain.is_caller_error());
        let opt = Error::from(tagged(ErrorKind::InvalidOption, "bits 9"));
        let again = Error::from(anyhow::Error::new(opt).context("quantizing"));
        assert_eq!(again.kind(), ErrorKind::InvalidOption);
        assert_eq!(again.to_string(), "quantizing: bits 9");
    }
}
