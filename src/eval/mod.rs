//! Quality measures: WikiText-2 style perplexity.

pub mod corpus;
pub mod perplexity;

pub use corpus::{find_wikitext2, load_corpus_text, wikitext_joined, Corpus};
pub use perplexity::{perplexity, PplOptions, PplResult};
