"""Chat messages -> prompt text with a checkpoint's Jinja chat template, as transformers' apply_chat_template does.

Templates come from checkpoints, i.e. from strangers: they run in Jinja's immutable sandbox (no attribute
access to internals, no mutation of the values passed in) and can reach only what Hugging Face templates
expect: `messages`, `add_generation_prompt`, the special tokens as strings (`bos_token`, `eos_token`, ...),
`tools` and `documents` (None unless given), any extra keyword, and the globals `raise_exception`,
`strftime_now`, plus the `tojson` filter and the `{% generation %}` tag of transformers.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The messages do not fit the template, or the template itself is broken; the message says which."""


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool,
                special_tokens: dict[str, str], **extra: Any) -> str:
    """Render `messages` (dicts with `role` and `content`) into the model's prompt text.

    special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...} (Tokenizer.special_tokens_map).
    extra: more template variables (e.g. tools=[...], enable_thinking=False); they override special_tokens.
    """
    messages = validate_messages(messages)
    variables = {"tools": None, "documents": None, **special_tokens, **extra}
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"chat template error: {error.message or type(error).__name__}") from None
    except Exception as error:  # the template's own code failed, e.g. "a" + none
        raise ChatTemplateError(f"chat template error: {type(error).__name__}: {error}") from None


def validate_messages(messages: Any) -> list[dict]:
    """Each message needs a string `role` and `content` (content may be missing on an assistant message that
    carries `tool_calls`). Which roles are allowed is the template's call (it raises if it minds). Keys set
    to None are dropped, as transformers does, so templates can test `message.tool_calls is defined`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages: at least one message is required")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}]: a message must be an object with role and content")
        message = {key: value for key, value in message.items() if value is not None}
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise ChatTemplateError(f"messages[{i}].role: required (a non-empty string)")
        if "content" not in message and "tool_calls" not in message:
            raise ChatTemplateError(f"messages[{i}].content: required")
        if "content" in message and not isinstance(message["content"], (str, list)):
            raise ChatTemplateError(f"messages[{i}].content: must be a string or a list of content parts")
        cleaned.append(message)
    return cleaned


def raise_exception(message: str) -> None:
    # Templates call this to refuse a conversation, e.g. roles that do not alternate.
    raise ChatTemplateError(str(message))


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
           sort_keys: bool = False) -> str:
    # Hugging Face's version: Jinja's own tojson escapes HTML characters and cannot indent.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in transformers; when
    rendering a prompt it is just its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks / lstrip_blocks: Hugging Face renders with both, and templates are written for that.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


ENVIRONMENT = _environment()


def _compile(template: str) -> jinja2.Template:
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("the model has no chat template")
    return _compile_cached(template)


@lru_cache(maxsize=32)
def _compile_cached(template: str) -> jinja2.Template:
    try:
        return ENVIRONMENT.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"chat template syntax error on line {error.lineno}: {error.message}") from None
