//! OpenAI CLIP's byte-pair tokenizer, offline: the vocabulary is compiled into the binary.
//!
//! A prompt becomes `[start] + BPE + [end]`, at most 77 ids. OpenAI's tokenizer refuses longer
//! text; we keep the first 75 BPE tokens and report how many were dropped, so the user can be
//! told rather than refused.

use instant_clip_tokenizer::{Token, Tokenizer};

/// Most ids CLIP's text tower accepts, start and end tokens included.
pub(crate) const CONTEXT_LENGTH: usize = 77;

/// A tokenised prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Start token, BPE tokens, end token.
    pub ids: Vec<u32>,
    /// BPE tokens cut off the end to fit (0 when the prompt fit).
    pub dropped: usize,
}

/// The CLIP tokenizer (lower-cases; no ftfy or HTML clean-up).
pub struct ClipTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClipTokenizer")
    }
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl ClipTokenizer {
    /// Loads the embedded vocabulary (a few milliseconds; keep one per process).
    pub fn new() -> Self {
        Self {
            inner: Tokenizer::new(),
        }
    }

    /// Tokenises `text`, truncating to [`CONTEXT_LENGTH`] ids.
    pub fn encode(&self, text: &str) -> Tokens {
        let mut bpe: Vec<Token> = Vec::new();
        self.inner.encode(text, &mut bpe);
        let room = CONTEXT_LENGTH - 2;
        let dropped = bpe.len().saturating_sub(room);
        bpe.truncate(room);
        let ids = std::iter::once(self.inner.start_of_text())
            .chain(bpe)
            .chain(std::iter::once(self.inner.end_of_text()))
            .map(|t| u32::from(t.to_u16()))
            .collect();
        Tokens { ids, dropped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_openai_ids() {
        // OpenAI's tokenizer: "a photo of a cat" → 320 1125 539 320 2368, with SOT/EOT around.
        let t = ClipTokenizer::new().encode("a photo of a cat");
        assert_eq!(t.ids, [49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!(t.dropped, 0);
        assert_eq!(
            ClipTokenizer::new().encode("A PHOTO of a Cat").ids,
            t.ids,
            "lower-cased"
        );
    }

    #[test]
    fn long_prompts_are_cut_to_77_ids_and_say_so() {
        let long = "castle ".repeat(100);
        let t = ClipTokenizer::new().encode(&long);
        assert_eq!(t.ids.len(), CONTEXT_LENGTH);
        assert_eq!(t.dropped, 25);
        assert_eq!(
            *t.ids.last().unwrap(),
            49407,
            "still ends with the end token"
        );
    }
}
