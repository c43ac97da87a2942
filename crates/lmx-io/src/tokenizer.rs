//! The Hugging Face tokenizer (the `tokenizers` crate, from `tokenizer.json`) and a streaming
//! decoder whose text deltas never split a multi-byte UTF-8 character.

use std::path::Path;

use crate::error::{IoError, Result};

/// A loaded tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The longest vocabulary string in UTF-8 bytes: no token stands for more text (byte-level
    /// and SentencePiece vocabularies spell a byte with 1-3), so `n` tokens never hold more
    /// than `n` times this.
    max_token_bytes: usize,
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if crate::config::is_missing(path)? {
            return Err(IoError::NotFound { path: path.to_path_buf(), hint: ": the model folder needs a tokenizer.json (Hugging Face fast-tokenizer format)".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| IoError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::new(inner))
    }

    /// Builds a tokenizer from a `tokenizer.json` value (as rebuilt from GGUF metadata).
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        let inner: tokenizers::Tokenizer = serde_json::from_value(json.clone()).map_err(|e| IoError::Tokenizer(format!("invalid tokenizer description: {e}")))?;
        Ok(Self::new(inner))
    }

    fn new(inner: tokenizers::Tokenizer) -> Self {
        let max_token_bytes = inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        Self { inner, max_token_bytes }
    }

    /// The bytes each token id stands for on its own, and whether it is a special (control)
    /// token, for constrained decoding (a grammar engine matches output bytes against the
    /// vocabulary). Byte-level vocabularies (GPT-2, Llama 3, Qwen, SmolLM2) map characters back
    /// to bytes; SentencePiece ones (Llama 2, Mistral) turn `▁` into a space and `<0xNN>` into
    /// byte NN. Ids without a token get an empty entry.
    pub fn token_bytes(&self) -> Result<Vec<(Vec<u8>, bool)>> {
        let decoder = serde_json::to_string(&self.inner.get_decoder()).unwrap_or_default();
        let byte_level = decoder.contains("\"ByteLevel\"");
        let byte_fallback = decoder.contains("\"ByteFallback\"");
        if !byte_level && !byte_fallback && !decoder.contains("Metaspace") {
            return Err(IoError::Tokenizer(format!("cannot tell the bytes of each token from this tokenizer's decoder ({decoder}): structured output needs a byte-level or SentencePiece vocabulary")));
        }
        let char_map = byte_level_chars();
        let vocab = self.inner.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut out = vec![(Vec::new(), false); size];
        for (text, &id) in &vocab {
            let bytes = if byte_level {
                text.chars().map(|c| char_map.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_else(|| text.as_bytes().to_vec())
            } else if let Some(byte) = text.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                vec![byte]
            } else {
                text.replace('\u{2581}', " ").into_bytes()
            };
            out[id as usize] = (bytes, false);
        }
        // Added tokens are stored as plain text, not in the byte-level alphabet.
        for (id, added) in self.inner.get_added_tokens_decoder() {
            if let Some(slot) = out.get_mut(id as usize) {
                *slot = (added.content.as_bytes().to_vec(), added.special);
            }
        }
        Ok(out)
    }

    /// [`Tokenizer::encode`] for text that must fit in `max_tokens` tokens: a text longer than
    /// that many tokens could possibly spell is refused before the (possibly long) encoding.
    pub fn encode_within(&self, text: &str, add_special_tokens: bool, max_tokens: usize) -> Result<Vec<u32>> {
        let limit = max_tokens.saturating_mul(self.max_token_bytes);
        if text.len() > limit {
            return Err(IoError::TextTooLong { bytes: text.len(), tokens: max_tokens, limit });
        }
        self.encode(text, add_special_tokens)
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor (a BOS
    /// token for Llama 3, nothing for SmolLM2); chat-template output is encoded without it,
    /// since the template already wrote the special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| IoError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included unless `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| IoError::Tokenizer(e.to_string()))
    }

    /// The id of a token string (special tokens included), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Saves `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| IoError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }
}

/// Turns a growing token sequence into text deltas.
///
/// Byte-level BPE tokens can end in the middle of a UTF-8 character, and SentencePiece
/// tokenizers change the leading space depending on context, so a delta is computed by decoding
/// a small window of recent tokens twice (with and without the new ones) and is held back while
/// it ends in an incomplete character (U+FFFD), the approach of Hugging Face's TGI.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder<'_> {
    /// Adds one token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let after = self.tokenizer.decode(&self.ids[self.prefix_offset..], false)?;
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let delta = match after.get(before.len()..) {
            Some(d) if after.starts_with(&before) => d.to_string(),
            // The window re-tokenized differently; emit what is new after the common prefix.
            _ => after.chars().skip(before.chars().count()).collect(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(delta))
    }

    /// Text still held back (an incomplete character at the very end), flushed as is.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let before = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let after = self.tokenizer.decode(&self.ids[self.prefix_offset..], false)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(after.get(before.len()..).map(str::to_string).filter(|s| !s.is_empty()))
    }
}

/// GPT-2's byte-level alphabet, reversed: the character that stands for each byte.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                next += 1;
                (char::from_u32(next - 1).unwrap_or(' '), b)
            }
        })
        .collect()
}
