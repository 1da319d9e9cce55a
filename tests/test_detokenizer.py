"""IncrementalDetokenizer: the streamed deltas concatenate to the full decode and never split a character."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.tokenizer.detokenizer import IncrementalDetokenizer
from tiny_tokenizers import CORPUS, tessera_tokenizer

NAMES = ["llama3", "qwen", "llama2", "unigram"]
MULTIBYTE = "aé日😀 \n.,👩‍💻🦀Ω☃ŧ€ß"  # 🦀 Ω ☃ ŧ € are not in the training corpus: byte fallback / <unk>


def stream(tokenizer, ids, chunk_sizes, skip_special_tokens=True, prompt=()):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas, start = [], 0
    for size in chunk_sizes:
        deltas.append(detokenizer.push(ids[start:start + size]))
        start += size
    if start < len(ids):
        deltas.append(detokenizer.push(ids[start:]))
    deltas.append(detokenizer.flush())
    return deltas


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_ids_in_any_chunks_concatenate_to_the_full_decode(data):
    # Random ids are the hard case: lone UTF-8 continuation bytes, byte-fallback runs cut by special tokens,
    # Metaspace pieces, unknown ids past the vocabulary.
    name = data.draw(st.sampled_from(NAMES))
    tok = tessera_tokenizer(name)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size + 2), max_size=40))
    chunks = data.draw(st.lists(st.integers(0, 4), max_size=len(ids)))
    skip = data.draw(st.booleans())
    deltas = stream(tok, ids, chunks, skip)
    assert "".join(deltas) == tok.decode_raw(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(NAMES), text=st.text(alphabet=MULTIBYTE, max_size=40), data=st.data())
def test_real_text_streams_token_by_token_without_broken_characters(name, text, data):
    tok = tessera_tokenizer(name)
    ids = tok.encode(text, add_special_tokens=data.draw(st.booleans()))
    deltas = stream(tok, ids, [1] * len(ids))
    full = tok.decode_raw(ids, skip_special_tokens=True)
    assert "".join(deltas) == full
    if name != "unigram":  # the one with clean_up_tokenization_spaces (a non-BPE model): decode() differs
        assert full == tok.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in full:
        assert not any("\ufffd" in delta for delta in deltas)


def test_one_character_over_several_tokens_is_held_back_until_complete():
    byte_level = tessera_tokenizer("llama3")  # 🦀 is not in its vocabulary: one token per UTF-8 byte
    ids = byte_level.encode("a🦀b", add_special_tokens=False)
    assert len(ids) == 5  # a, F0 9F (merged: a common emoji prefix), A6, 80, b
    assert stream(byte_level, ids, [1] * len(ids)) == ["a", "", "", "🦀", "b", ""]

    sentencepiece = tessera_tokenizer("llama2")  # four <0xNN> byte-fallback tokens, released with the next token
    ids = sentencepiece.encode("a🦀b", add_special_tokens=False)
    tokens = sentencepiece.convert_ids_to_tokens(ids)
    assert tokens[-5:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>", "b"]
    assert stream(sentencepiece, ids, [1] * len(ids))[-6:] == ["", "", "", "", "🦀b", ""]


def test_metaspace_leading_space_depends_on_context():
    # "▁" becomes a space except on the first token of the text: each delta must know what came before.
    for name, tokens, expected in [
        ("llama2", ["▁the", "▁quick", "▁brown", "▁fox"], ["the", " quick", " brown", " fox"]),
        ("unigram", ["▁b", "▁f", "o", "▁b"], ["b", " f", "o", " b"]),
    ]:
        tok = tessera_tokenizer(name)
        ids = [tok.token_to_id(token) for token in tokens]
        assert stream(tok, ids, [1] * len(ids))[:-1] == expected
        assert "".join(expected) == tok.decode(ids)


def test_special_tokens_skipped_or_kept():
    tok = tessera_tokenizer("llama3")
    ids = tok.encode("Hello") + [tok.token_to_id("<|eot_id|>")] + tok.encode(" world", add_special_tokens=False)
    assert "".join(stream(tok, ids, [1] * len(ids))) == "Hello world"
    kept = "".join(stream(tok, ids, [1] * len(ids), skip_special_tokens=False))
    assert kept == tok.decode(ids) == "<|begin_of_text|>Hello<|eot_id|> world"


def test_window_stays_small_on_a_long_stream():
    tok = tessera_tokenizer("llama2")
    ids = tok.encode(" ".join(CORPUS) * 3, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tok, [1])
    widest = 0
    decode = tok.decode_raw

    def measured(window, skip_special_tokens=False):
        nonlocal widest
        widest = max(widest, len(window))
        return decode(window, skip_special_tokens)

    tok.decode_raw = measured
    try:
        text = "".join(detokenizer.push([i]) for i in ids) + detokenizer.flush()
    finally:
        del tok.decode_raw
    assert text == tok.decode(ids)
    assert len(ids) > 500 and widest <= 8  # O(window) per token, not O(text)
