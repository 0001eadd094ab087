//! Quality measures: WikiText-2 style perplexity; KL divergence, top-1 agreement and
//! probability change against a base model; the comparison report and its plots.

pub mod corpus;
pub mod divergence;
pub mod kl;
pub mod logits_file;
pub mod perplexity;
pub mod plot;
pub mod report;
pub mod stats;
pub mod windows;

pub use corpus::{find_wikitext2, load_corpus_text, read_text_file, wikitext_joined, Corpus};
pub use kl::{kl_divergence, KlBase, KlOptions, KlResult};
pub use logits_file::{LogitsHeader, LogitsReader, LogitsWriter};
pub use perplexity::{perplexity, perplexity_saving, PplOptions, PplResult};
