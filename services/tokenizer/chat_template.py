"""Chat messages -> prompt text with a checkpoint's Jinja chat template, as transformers' apply_chat_template does.

Templates come from checkpoints, i.e. from strangers: they run in Jinja's immutable sandbox (no attribute
access to internals, no mutation of the values passed in) and can reach only what Hugging Face templates
expect: `messages`, `add_generation_prompt`, the special tokens as strings (`bos_token`, `eos_token`, ...),
`tools` and `documents` (None unless given), any extra keyword, and the globals `raise_exception`,
`strftime_now`, plus the `tojson` filter and the `{% generation %}` tag of transformers.

A template sent by a client renders with render_client_chat instead, in CLIENT_ENVIRONMENT: the same, plus cheap
refusals of the one-liners that ask for gigabytes ('x' * 10**9, range(10**9), tojson(indent=10**9)) and a cap on
the output. The real bounds on time and memory are the separate process it runs in (chat_sandbox.py).
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


class TemplateLimitError(ChatTemplateError):
    """A client's template asked for more than the sandbox allows; `field` is the request field to blame."""

    def __init__(self, message: str, field: str = "chat_template"):
        super().__init__(message)
        self.field = field


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool,
                special_tokens: dict[str, str], **extra: Any) -> str:
    """Render `messages` (dicts with `role` and `content`) into the model's prompt text.

    special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...} (Tokenizer.special_tokens_map).
    extra: more template variables (e.g. tools=[...], enable_thinking=False); they override special_tokens.
    """
    return _render(ENVIRONMENT, template, messages, add_generation_prompt, special_tokens, extra)


def render_client_chat(template: str, messages: list[dict], add_generation_prompt: bool,
                       special_tokens: dict[str, str], max_bytes: int) -> str:
    """render_chat for a template from a request, in CLIENT_ENVIRONMENT; it stops as soon as the text passes
    max_bytes of UTF-8 (TemplateLimitError naming `messages`, as an over-long prompt is). A MemoryError is
    raised as it is: the sandbox process reports it as its memory limit."""
    return _render(CLIENT_ENVIRONMENT, template, messages, add_generation_prompt, special_tokens, {}, max_bytes)


def _render(env, template, messages, add_generation_prompt, special_tokens, extra, max_bytes=None) -> str:
    messages = validate_messages(messages)
    variables = {"tools": None, "documents": None, **special_tokens, **extra}
    try:
        compiled = _compile(env, template)
        if max_bytes is None:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        pieces = compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        return _join_within(pieces, max_bytes)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"chat template error: {error.message or type(error).__name__}") from None
    except Exception as error:  # the template's own code failed, e.g. "a" + none
        if isinstance(error, MemoryError) and max_bytes is not None:
            raise  # the sandbox's memory limit: its process reports that
        raise ChatTemplateError(f"chat template error: {type(error).__name__}: {error}") from None


def _join_within(pieces, max_bytes: int) -> str:
    out, size = [], 0
    for piece in pieces:
        size += len(piece.encode())  # strict: a lone surrogate is the template's error, not ours later
        if size > max_bytes:
            raise TemplateLimitError(f"the chat rendered with its template is more than {max_bytes} bytes (UTF-8); "
                                     f"at most {max_bytes} are allowed", field="messages")
        out.append(piece)
    return "".join(out)


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


def _environment(env_class=ImmutableSandboxedEnvironment) -> ImmutableSandboxedEnvironment:
    # trim_blocks / lstrip_blocks: Hugging Face renders with both, and templates are written for that.
    env = env_class(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ClientEnvironment(ImmutableSandboxedEnvironment):
    """For templates sent by clients: refuses, before the work, the cheap ways to ask for gigabytes or hours in
    one expression. Real templates need none of this (they repeat a string a few times, if ever)."""

    MAX_ITEMS = 1 << 20  # 'x' * n, [..] * n: more than a whole default prompt (--max-prompt-bytes)
    MAX_RANGE = 10_000  # range(): Jinja's sandbox allows 100,000; nested loops multiply it
    MAX_POWER_BITS = 1 << 16  # n ** m on integers
    MAX_INDENT = 16  # tojson(indent=...)

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for items, count in ((left, right), (right, left)):
                if isinstance(items, (str, list, tuple)) and isinstance(count, int) and \
                        len(items) * count > self.MAX_ITEMS:
                    raise TemplateLimitError(f"a sequence of {len(items)} repeated {count} times is more than the "
                                             f"{self.MAX_ITEMS} items a template may build")
        elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * abs(left).bit_length() > self.MAX_POWER_BITS:
            raise TemplateLimitError(f"{left} ** {right} has more than {self.MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)

    def range(self, *args: int) -> range:
        numbers = range(*args)
        if len(numbers) > self.MAX_RANGE:
            raise TemplateLimitError(f"range() of {len(numbers)} numbers; at most {self.MAX_RANGE} are allowed")
        return numbers

    def tojson(self, value: Any, ensure_ascii: bool = False, indent: int | str | None = None, separators=None,
               sort_keys: bool = False) -> str:
        if isinstance(indent, (int, str)) and (len(indent) if isinstance(indent, str) else indent) > self.MAX_INDENT:
            raise TemplateLimitError(f"tojson: indent {indent if isinstance(indent, int) else repr(indent[:20])} is "
                                     f"more than {self.MAX_INDENT}")
        return tojson(value, ensure_ascii, indent, separators, sort_keys)


ENVIRONMENT = _environment()
CLIENT_ENVIRONMENT = _environment(ClientEnvironment)
CLIENT_ENVIRONMENT.globals["range"] = CLIENT_ENVIRONMENT.range
CLIENT_ENVIRONMENT.filters["tojson"] = CLIENT_ENVIRONMENT.tojson


def _compile(env: jinja2.Environment, template: str) -> jinja2.Template:
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("the model has no chat template")
    return _compile_cached(env, template)


@lru_cache(maxsize=32)
def _compile_cached(env: jinja2.Environment, template: str) -> jinja2.Template:
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"chat template syntax error on line {error.lineno}: {error.message}") from None
