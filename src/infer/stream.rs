//! Turning generated token ids into text as they arrive.
//!
//! A byte-level BPE token can carry part of a multi-byte UTF-8 character, and
//! SentencePiece decoders treat a sequence's first token specially (the leading space), so
//! decoding each token alone is wrong. [`TextStream`] decodes a short window of recent
//! tokens twice (with and without the newest ones) and emits the difference once it ends
//! in complete characters, the way text-generation-inference does. [`StopStrings`] holds
//! back text that may be the start of a stop string, so a stop string is never streamed.

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

/// Incremental detokenizer for one sequence.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens before this have been emitted as text.
    read: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding tokens {ids:?}: {e}"))
    }

    /// Add a token; returns the text it completes (empty while a character is unfinished).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let now = self.decode(&self.ids[self.prefix..])?;
        // U+FFFD at the end: the last token stopped inside a character
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(new) = now.get(before.len()..) {
                self.prefix = self.read;
                self.read = self.ids.len();
                return Ok(new.to_string());
            }
        }
        Ok(String::new())
    }

    /// Whatever text is still held (an unfinished character decodes to U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let now = self.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

/// Stop strings over streamed text: emits text once it cannot be the start of a stop
/// string, and reports the first stop string found.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Add streamed text. Returns the text safe to emit and, when a stop string has
    /// appeared, its index in the list (the text is then cut just before it).
    pub fn push(&mut self, text: &str) -> (String, Option<usize>) {
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, Some(i));
        }
        // keep the longest tail that a stop string starts with
        let keep_from = self
            .held
            .char_indices()
            .map(|(at, _)| at)
            .find(|&at| {
                let tail = &self.held[at..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (out, None)
    }

    /// The held-back text, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopStrings::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = s.push(p);
            out.push_str(&t);
            if hit.is_some() {
                return (out, hit, String::new());
            }
        }
        (out, None, s.finish())
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_emitted() {
        let (out, hit, rest) = run(&["</s>", "END"], &["Hello </", "s", "> more"]);
        assert_eq!((out.as_str(), hit, rest.as_str()), ("Hello ", Some(0), ""));
        let (out, hit, _) = run(&["END"], &["abcEN", "Dxyz"]);
        assert_eq!((out.as_str(), hit), ("abc", Some(0)));
    }

    #[test]
    fn a_false_start_is_released_and_the_tail_flushed() {
        let (out, hit, rest) = run(&["END"], &["abcEN", "d é", "E"]);
        assert_eq!(hit, None);
        assert_eq!(out, "abcENd é");
        assert_eq!(rest, "E");
    }

    #[test]
    fn earliest_stop_string_wins() {
        let (out, hit, _) = run(&["bb", "a"], &["xxbba"]);
        assert_eq!((out.as_str(), hit), ("xx", Some(0)));
    }
}
