"""Tiny Hugging Face tokenizer directories, trained locally with `tokenizers` (no model hub needed).

One per pipeline worth testing, each built once per test process by `tokenizer_dirs()`:

- "llama3": byte-level BPE whose post-processor adds BOS (<|begin_of_text|>), Llama 3 style special tokens,
  everything in tokenizer_config.json (added_tokens_decoder, chat_template), generation_config.json with two EOS.
- "qwen": byte-level BPE without BOS; legacy special_tokens_map.json (AddedToken dicts, additional special
  tokens, an unk token missing from tokenizer.json that must be appended), chat templates as a named list.
- "llama2": SentencePiece-style BPE with byte fallback, a Metaspace pre-tokenizer and a decoder that strips the
  leading space; no post-processor, so BOS comes from `add_bos_token` in tokenizer_config.json.
- "unigram": SentencePiece-style Unigram with a Metaspace decoder and clean_up_tokenization_spaces.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "naïve café, résumé, façade, Übermäßig, señor, crème brûlée.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "😀 emoji 🎉 party 👩‍💻 coder 🇫🇷 flag, ½ ∑ ∞ → arrows.",
    "def add(a, b):\n    return a + b  # numbers 0123456789\n",
    "Don't stop, we're here; it's fine. I've been, you'll see!",
    "   leading spaces, trailing spaces   \n\n\ttabs and\r\nnewlines",
] * 3

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]

CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

LLAMA3 = """{{- bos_token }}
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|start_header_id|>system<|end_header_id|>

You are helpful.<|eot_id|>
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

TOOLS = """{%- if tools %}
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and not loop.first %}{% continue %}{% endif %}
    {%- if loop.index > 6 %}{% break %}{% endif %}
<{{ message.role }}>{% generation %}{{ message.content }}{% endgeneration %}
    {%- if message.tool_calls is defined %}
{{ message.tool_calls | tojson(indent=2) }}
    {%- endif %}
</{{ message.role }}>
{%- endfor %}
{%- if add_generation_prompt %}
<assistant>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{%- endif %}
"""


def _byte_level_bpe(specials: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def _sentencepiece_bpe() -> Tokenizer:
    # Train a Metaspace BPE, then rebuild its vocabulary Llama 2 style: <unk> <s> </s>, the 256 <0xNN> byte
    # tokens (in the base vocabulary, not added tokens: byte fallback needs them there), then the rest.
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=SP_SPECIALS,
                                                        show_progress=False))
    spec = json.loads(tok.to_str())
    learned = sorted((i, t) for t, i in spec["model"]["vocab"].items() if t not in SP_SPECIALS)
    vocab = SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in learned]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(vocab)}
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(SP_SPECIALS)]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    return tok


def _unigram() -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=SP_SPECIALS,
                                                            unk_token="<unk>", show_progress=False))
    return tok


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict]:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in tok.get_added_tokens_decoder().items()}


def _save(root: Path, name: str, tok: Tokenizer, config: dict, **files: dict) -> Path:
    path = root / name
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    for file, content in files.items():
        (path / f"{file}.json").write_text(json.dumps(content, ensure_ascii=False, indent=1))
    return path


@functools.cache
def tokenizer_dirs() -> dict[str, Path]:
    root = Path(tempfile.mkdtemp(prefix="tessera-tokenizers-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)

    llama3 = _byte_level_bpe(LLAMA3_SPECIALS, 600)
    llama3.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", llama3.token_to_id("<|begin_of_text|>"))]),
    ])
    qwen = _byte_level_bpe(QWEN_SPECIALS, 500)
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)
    token = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "llama3": _save(root, "llama3", llama3, {
            "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": _added_tokens_decoder(llama3), "chat_template": LLAMA3,
            "clean_up_tokenization_spaces": True, "model_max_length": 8192},
            generation_config={"bos_token_id": 0, "eos_token_id": [1, 4]}),
        "qwen": _save(root, "qwen", qwen, {
            "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": TOOLS}],
            "model_max_length": int(1e30), "errors": "replace"},
            special_tokens_map={"eos_token": {**token, "content": "<|im_end|>"}, "pad_token": "<|endoftext|>",
                                "unk_token": "<|unk|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}),
        "llama2": _save(root, "llama2", _sentencepiece_bpe(), {
            "bos_token": {**token, "content": "<s>"}, "eos_token": {**token, "content": "</s>"},
            "unk_token": {**token, "content": "<unk>"}, "add_bos_token": True, "add_eos_token": False,
            "chat_template": MISTRAL, "legacy": False}),
        "unigram": _save(root, "unigram", _unigram(), {
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": True}),
    }


@functools.cache
def tessera_tokenizer(name: str):
    from tessera.tokenizer.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dirs()[name])


@functools.cache
def hf_tokenizer(name: str):
    """The transformers reference for a tokenizer_dirs() entry. For "llama2", whose BOS comes from add_bos_token
    in tokenizer_config.json, the flag is passed explicitly: transformers 5 ignores it in the file whenever a
    tokenizer.json exists (see tessera.tokenizer.tokenizer)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    extra = {"add_bos_token": True} if name == "llama2" else {}
    return AutoTokenizer.from_pretrained(str(tokenizer_dirs()[name]), **extra)


TEXTS = [
    "", " ", "Hello world!", " Hello  world ", "naïve café 日本語 😀 emoji", "👩‍💻🇫🇷 ½∑∞", "Ω unseen ŧ€xt ☃ 🦀",
    "line one\nline two\r\n\ttabbed", "Don't stop, we're here; it's fine .", "<s>Hello</s> <|im_start|>user",
    "<|begin_of_text|>hi<|eot_id|>", "a" * 50, "日本語日本語" * 5,
]
