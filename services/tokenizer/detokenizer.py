"""Token ids in, text deltas out, one step of a generation stream at a time.

Decoding token by token does not work: in byte-level BPE one character can span several tokens (each alone
decodes to U+FFFD), and SentencePiece-style decoders drop the leading space of whatever token comes first. So
we decode a small sliding window instead (the idea vLLM and TGI use):

    ids:  ... | prefix_offset ............ read_offset ........ end |
                 (context, already emitted)   (new, not yet emitted)

    delta = decode(window[prefix:end]) minus decode(window[prefix:read])

Both decodes start at the same token, so whatever the decoder does to the first token of a window happens to
both and cancels out; the new tokens come out exactly as they do in the full decode. While the text ends in
U+FFFD (a character whose bytes have not all arrived), or in a run of SentencePiece byte-fallback tokens
(<0xE6>: such a run decodes as one group), we emit nothing and keep collecting. After each emit the window
slides forward (prefix := read, read := end), so a step costs O(window), not O(text so far).

Contract: the deltas of `push` plus `flush` concatenate to `tokenizer.decode_raw(generated_ids,
skip_special_tokens)`, which is `tokenizer.decode(...)` for every tokenizer without `clean_up_tokenization_spaces`
(all BPE models, i.e. the Llama family, Mistral, Qwen). The generated text is decoded on its own, as
`tokenizer.decode(output_ids)` does in transformers: the first generated token is not decoded as a continuation
of the prompt (SentencePiece's "▁Paris" after a prompt comes out as "Paris", not " Paris").
"""
from __future__ import annotations

from typing import Iterable, Sequence

from .tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        # The prompt is not decoded (see the contract above): the signature takes it so that a caller can hand
        # over the request as vLLM's does, and it is kept only as a count.
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_generated_tokens = 0
        self._window: list[int] = []  # generated ids from the prefix offset on; older ids are dropped
        self._read = 0                # window index of the first id whose text has not been emitted yet
        self._context_text = ""       # decode(window[:read]): text already emitted, decoded again as context

    def push(self, new_token_ids: Iterable[int]) -> str:
        """Add newly generated ids; return the text they complete (possibly "")."""
        before = len(self._window)
        self._window.extend(new_token_ids)
        self.num_generated_tokens += len(self._window) - before
        if self._ends_in_byte_run():
            return ""
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(self._context_text):
            # An unfinished character, or nothing new yet (e.g. a skipped special token): wait, keeping the
            # window where it is so the context for the next token stays right.
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """The text still held back at the end of the stream (a trailing U+FFFD stays as decode gives it)."""
        return self._emit(self._decode(self._window))

    def _emit(self, text: str) -> str:
        # Slide: the ids just emitted become the next context, the old context is dropped.
        delta = text[len(self._context_text):]
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        return delta

    def _ends_in_byte_run(self) -> bool:
        # SentencePiece byte fallback decodes a run of <0xNN> tokens as one group, and one bad byte turns the
        # whole run into U+FFFDs, even the valid "<0x41>" before it. So a run is only final once a token that
        # the decoder sees (not a skipped special token, not an unknown id) ends it.
        for token_id in reversed(self._window[self._read:]):
            if not self._invisible(token_id):
                return token_id in self.tokenizer.byte_fallback_ids
        return False

    def _invisible(self, token_id: int) -> bool:
        skipped = self.skip_special_tokens and token_id in self.tokenizer.skipped_special_ids
        return skipped or self.tokenizer.backend.id_to_token(token_id) is None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode_raw(ids, skip_special_tokens=self.skip_special_tokens)
