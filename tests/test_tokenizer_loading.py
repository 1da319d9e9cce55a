"""tessera.tokenizer.Tokenizer against transformers.AutoTokenizer on locally trained tokenizers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.tokenizer.tokenizer import Tokenizer, TokenizerError
from tiny_tokenizers import CHATML, CORPUS, TEXTS, TOOLS, hf_tokenizer, tessera_tokenizer, tokenizer_dirs

NAMES = ["llama3", "qwen", "llama2", "unigram"]
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    return tessera_tokenizer(request.param), hf_tokenizer(request.param)


def test_encode_matches_transformers(pair):
    ours, hf = pair
    for text in TEXTS + CORPUS[:7]:
        for add_special_tokens in (True, False):
            assert ours.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens)


def test_offsets_match_transformers(pair):
    ours, hf = pair
    for text in TEXTS:
        ids, offsets = ours.encode_with_offsets(text)
        reference = hf(text, return_offsets_mapping=True)
        assert ids == reference["input_ids"]
        assert offsets == [tuple(span) for span in reference["offset_mapping"]]


def test_decode_matches_transformers(pair):
    ours, hf = pair
    for text in TEXTS:
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_decode_of_any_ids_matches_transformers(data):
    name = data.draw(st.sampled_from(NAMES))
    ours, hf = tessera_tokenizer(name), hf_tokenizer(name)
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=24))
    skip = data.draw(st.booleans())
    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(NAMES), text=st.text(alphabet="ab é日😀 \n<>/s|", max_size=30))
def test_encode_of_any_text_matches_transformers(name, text):
    assert tessera_tokenizer(name).encode(text) == hf_tokenizer(name).encode(text)


def test_special_tokens_and_vocab_match_transformers(pair):
    ours, hf = pair
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.all_special_ids == hf.all_special_ids
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                          hf.pad_token_id)
    assert ours.vocab_size == len(hf)
    ids = list(range(ours.vocab_size))
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[-1]) == hf.convert_ids_to_tokens(ids[-1])


def test_bos_from_post_processor_and_from_add_bos_token():
    llama3, llama2, qwen = tessera_tokenizer("llama3"), tessera_tokenizer("llama2"), tessera_tokenizer("qwen")
    assert llama3.encode("hi")[0] == llama3.bos_token_id == llama3.token_to_id("<|begin_of_text|>")
    assert llama3.encode("hi", add_special_tokens=False)[0] != llama3.bos_token_id
    # llama2's tokenizer.json has no post-processor: BOS comes from add_bos_token in tokenizer_config.json.
    assert llama2.encode("hi")[0] == llama2.bos_token_id == 1
    assert llama2.encode("hi", add_special_tokens=False)[0] != 1
    assert qwen.bos_token_id is None and qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)


def test_config_details():
    llama3, qwen = tessera_tokenizer("llama3"), tessera_tokenizer("qwen")
    assert llama3.eos_token_ids == (1, 4)  # <|end_of_text|> plus generation_config.json's <|eot_id|>
    assert llama3.model_max_length == 8192 and qwen.model_max_length is None
    assert llama3.chat_template == hf_tokenizer("llama3").chat_template
    assert qwen.chat_templates == {"default": CHATML, "tool_use": TOOLS} == hf_tokenizer("qwen").chat_template
    # special_tokens_map.json named an unk token that tokenizer.json lacks: it is appended as a special token.
    assert qwen.token_to_id("<|unk|>") == qwen.vocab_size - 1 and qwen.unk_token_id == qwen.vocab_size - 1
    assert qwen.decode(qwen.encode("a<|unk|>b"), skip_special_tokens=True) == "ab"


def test_standalone_chat_template_file_wins(tmp_path):
    shutil.copytree(tokenizer_dirs()["llama3"], tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "tok" / "additional_chat_templates").mkdir()
    (tmp_path / "tok" / "additional_chat_templates" / "rag.jinja").write_text("rag")
    tok = Tokenizer(tmp_path / "tok")
    assert tok.chat_templates == {"default": "{{ messages[0]['content'] }}", "rag": "rag"}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], template_name="rag") == "rag"


def test_missing_or_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    assert issubclass(TokenizerError, ValueError)

    shutil.copy(tokenizer_dirs()["llama3"] / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 7}))
    with pytest.raises(TokenizerError, match="chat_template"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "evil.Tok"}}))
    assert Tokenizer(tmp_path).encode("hi")  # remote code is never looked at, let alone run


@pytest.mark.skipif(not (DEMO_MODEL / "tokenizer.json").is_file(), reason="the demo model is not checked out")
def test_demo_model_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    ours, hf = Tokenizer(DEMO_MODEL), AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    for text in TEXTS + ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert (ours.vocab_size, ours.all_special_ids, ours.special_tokens_map) == (len(hf), hf.all_special_ids,
                                                                                 hf.special_tokens_map)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
