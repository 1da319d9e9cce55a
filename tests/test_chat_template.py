"""render_chat against transformers' apply_chat_template(tokenize=False), and its errors."""
from __future__ import annotations

import jinja2
import pytest

from tessera.tokenizer.chat_template import ChatTemplateError, render_chat
from tiny_tokenizers import CHATML, LLAMA3, MISTRAL, TOOLS, hf_tokenizer, tessera_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse. «Ünïcödé» 日本語 😀"},
    {"role": "user", "content": "  Hi there  "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Say \"</s>\" & <b>bye</b>\n"},
]
ALTERNATING = CONVERSATION[1:]
TOOL_LIST = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo à Paris",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CALLING = [
    {"role": "system", "content": "first system"},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "note": "ünïcode"}}}]},
    {"role": "system", "content": "a second system message is skipped with {% continue %}"},
    {"role": "tool", "content": "22°C"},
    *[{"role": "user", "content": f"more {i}"} for i in range(5)],  # past loop.index 6: {% break %}
]

CASES = [  # (tokenizer whose special tokens the template sees, template, messages, extra kwargs)
    ("qwen", CHATML, CONVERSATION, {}),
    ("llama3", LLAMA3, CONVERSATION, {}),
    ("llama3", LLAMA3, ALTERNATING, {}),
    ("llama2", MISTRAL, ALTERNATING, {}),
    ("qwen", TOOLS, TOOL_CALLING, {"tools": TOOL_LIST}),
    ("qwen", TOOLS, CONVERSATION, {"enable_thinking": False}),
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name,template,messages,extra", CASES)
def test_render_matches_transformers(name, template, messages, extra, add_generation_prompt):
    ours = render_chat(template, messages, add_generation_prompt, tessera_tokenizer(name).special_tokens_map, **extra)
    reference = hf_tokenizer(name).apply_chat_template(messages, chat_template=template, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt, **extra)
    assert ours == reference


def test_tokenizer_uses_its_own_template():
    for name in ("llama3", "qwen", "llama2"):
        messages = ALTERNATING
        ours = tessera_tokenizer(name).apply_chat_template(messages, add_generation_prompt=True)
        assert ours == hf_tokenizer(name).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # tools select the "tool_use" template, as in transformers
    assert tessera_tokenizer("qwen").apply_chat_template(TOOL_CALLING, tools=TOOL_LIST).startswith("<tools>")


def test_rendered_examples():
    assert render_chat(CHATML, [{"role": "user", "content": "hi"}], True, {}) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = render_chat(TOOLS, TOOL_CALLING, False, {}, tools=TOOL_LIST)
    assert '"description": "Météo à Paris"' in out  # tojson keeps non-ASCII and does not HTML-escape
    assert '[\n  {\n    "type": "function"' in out  # tojson(indent=2)
    assert "second system" not in out and "more 3" not in out  # {% continue %} and {% break %}


def test_raise_exception_is_a_chat_template_error_in_both():
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(ChatTemplateError) as error:
        render_chat(MISTRAL, bad, True, tessera_tokenizer("llama2").special_tokens_map)
    assert str(error.value) == message
    with pytest.raises(jinja2.TemplateError, match="Conversation roles must alternate"):
        hf_tokenizer("llama2").apply_chat_template(bad, chat_template=MISTRAL, tokenize=False)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        render_chat(MISTRAL, [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}], True, {})


@pytest.mark.parametrize("template,match", [
    ("{{ messages[0].content.missing.deeper }}", "'str object' has no attribute 'missing'"),  # undefined, used
    ("{% for m in messages %}{{ m.content }}", "syntax error on line 1"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
    ("{{ ''.__class__.__mro__ }}", "chat template error"),  # the sandbox refuses internals
    ("{% set _ = messages.append(1) %}", "chat template error"),  # and mutation of what it was given
    ("{{ strftime_now('%Y') | int > 2000 }}", None),
])
def test_template_errors_are_chat_template_errors(template, match):
    messages = [{"role": "user", "content": "hi"}]
    if match is None:
        assert render_chat(template, messages, False, {}) == "True"
        return
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(template, messages, False, {})


def test_messages_are_validated_by_field():
    def render(messages):
        return render_chat(CHATML, messages, True, {})

    with pytest.raises(ChatTemplateError, match=r"messages\[2\]\.role"):
        render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"content": "c"}])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\.content"):
        render([{"role": "user"}])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\.content"):
        render([{"role": "user", "content": 3}])
    with pytest.raises(ChatTemplateError, match="at least one message"):
        render([])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat("", [{"role": "user", "content": "a"}], True, {})
    # A role the template does not know is the template's business: ChatML takes any.
    assert render([{"role": "critic", "content": "x"}]).startswith("<|im_start|>critic\n")
