"""Structured output: a request's constraint compiled against the model's vocabulary, a matcher per request,
and the allowed-token bitmask the matcher hands the worker for every step that samples.

The grammar engine is xgrammar: its masks are computed in native code from a grammar compiled ahead of time
(tokens whose fate does not depend on the parser stack are sorted out once, at compile time), which makes a
mask cost a few microseconds a step where llguidance, measured side by side on the same vocabularies, took ten
times longer at the median and up to ~1.5 ms (README, Structured outputs). Compiling takes milliseconds to
seconds, so it runs on a thread pool, off the event loop and the engine's step loop, bounded by a timeout, and
compiled grammars are cached by constraint: a repeated schema costs nothing. Everything is built on first
use, so an engine that never sees a constraint never imports xgrammar.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from tessera.sampling_params import InvalidParam

_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
MAX_JSON_WHITESPACE = 16  # any_whitespace: at most this many in a row, so the model cannot pad forever


@dataclass(frozen=True)
class StructuredOutput:
    """One request's constraint: exactly one of the five kinds (the tessera.engine.v1 oneof)."""

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None  # GBNF (llama.cpp's EBNF); the start rule is `root`
    choice: tuple[str, ...] | None = None
    any_whitespace: bool = False  # JSON only: any whitespace between tokens instead of compact JSON

    @property
    def kind(self) -> str:
        """The field that is set; InvalidParam unless exactly one is."""
        kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise InvalidParam("structured_output", f"set exactly one of {', '.join(_KINDS)}; got "
                               f"{', '.join(kinds) if kinds else 'none'}")
        return kinds[0]

    @property
    def field(self) -> str:
        return f"structured_output.{self.kind}"

    def validate(self) -> None:
        """What can be checked without the grammar engine."""
        if self.kind == "choice":
            if not self.choice:
                raise InvalidParam(self.field, "needs at least one choice")
            if any(not c for c in self.choice):
                raise InvalidParam(self.field, "choices must not be empty strings")
        elif self.kind != "json_object" and not getattr(self, self.kind).strip():
            raise InvalidParam(self.field, "must not be empty")


@dataclass(frozen=True)
class CompiledConstraint:
    """A constraint compiled against one model's vocabulary; shared by every request that uses it."""

    spec: StructuredOutput
    grammar: object  # xgrammar.CompiledGrammar
    terminate_without_eos: bool  # the model has no EOS token: the request ends when the grammar does

    def matcher(self):
        """A fresh matcher for one request (or one of its n samples): its own parser state."""
        import xgrammar

        return xgrammar.GrammarMatcher(self.grammar, terminate_without_stop_token=self.terminate_without_eos)


class GrammarCompiler:
    """Engine-wide: the vocabulary (from the checkpoint's tokenizer.json), a compile pool, a cache."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int], timeout: float = 10.0,
                 cache_size: int = 512, threads: int = 2):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.timeout = timeout
        self.cache_size = cache_size
        self.words = (vocab_size + 31) // 32  # int32 words of one bitmask row
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tessera-grammar")
        self._cache: OrderedDict[StructuredOutput, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._vocabulary: Future | None = None  # of the xgrammar.GrammarCompiler, started on first use

    # -- compiling -----------------------------------------------------------------------------------------

    def submit(self, spec: StructuredOutput) -> Future:
        """The (possibly shared, possibly finished) compilation of `spec`; InvalidParam for what fails early."""
        spec.validate()
        self._setup()  # first in the pool's queue: the compile below waits for it
        with self._lock:
            future = self._cache.get(spec)
            if future is not None and not future.cancelled():
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def compile(self, spec: StructuredOutput) -> CompiledConstraint:
        """Blocking: the compiled constraint, or InvalidParam naming the field (bad input, or too slow)."""
        future = self.submit(spec)
        self._setup().result()  # once per engine (imports, the vocabulary): not the constraint's own time
        try:
            return future.result(self.timeout)
        except FutureTimeout:
            raise self._too_slow(spec) from None

    async def compile_async(self, spec: StructuredOutput) -> CompiledConstraint:
        """As compile(), awaiting on the event loop instead of blocking it. A caller that gives up (its client
        cancelled, or the timeout) leaves the shared compilation running for the cache: hence the shields."""
        future = self.submit(spec)
        await asyncio.shield(asyncio.wrap_future(self._setup()))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout)
        except asyncio.TimeoutError:
            raise self._too_slow(spec) from None

    def _too_slow(self, spec: StructuredOutput) -> InvalidParam:
        return InvalidParam(spec.field, f"compiling the constraint took longer than {self.timeout:g} s "
                                        "(the engine's --structured-output-timeout); simplify it")

    def _compile(self, spec: StructuredOutput) -> CompiledConstraint:
        compiler = self._setup().result()
        try:
            if spec.kind in ("json_schema", "json_object"):
                grammar = compiler.compile_grammar(_json_grammar(spec))
            elif spec.kind == "regex":
                grammar = compiler.compile_regex(spec.regex)
            elif spec.kind == "grammar":
                grammar = compiler.compile_grammar(spec.grammar)
            else:  # choice: one GBNF alternative per string; JSON string escapes are GBNF's escapes
                grammar = compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
        except json.JSONDecodeError as e:  # (a subclass of ValueError: first)
            raise InvalidParam(spec.field, f"not valid JSON: {e}") from None
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidParam(spec.field, _reason(e)) from None
        return CompiledConstraint(spec, grammar, terminate_without_eos=not self.eos_token_ids)

    def _setup(self) -> Future:
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = self._pool.submit(_xgrammar_compiler, self.model_dir, self.vocab_size,
                                                     self.eos_token_ids)
            return self._vocabulary


def _xgrammar_compiler(model_dir: Path, vocab_size: int, eos_token_ids: list[int]):
    """An xgrammar GrammarCompiler for the checkpoint's tokenizer (read locally, never from a hub)."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise InvalidParam("structured_output", f"the engine's model directory {model_dir} has no tokenizer.json, "
                                                "which structured output needs for the vocabulary")
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    # transformers' wrapper only reads the file; xgrammar uses it to tell byte-level from byte-fallback vocabularies.
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                   stop_token_ids=eos_token_ids or None)
    # Our own pool does the threading (and the timeout); xgrammar's cache is ours too (by constraint).
    return xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def _json_grammar(spec: StructuredOutput) -> str:
    """The GBNF of a JSON constraint, as xgrammar converts it, with one of its bugs mended."""
    import xgrammar

    if spec.kind == "json_schema":
        json.loads(spec.json_schema)  # the clearer message for plain syntax errors
    schema, strict = (spec.json_schema, True) if spec.kind == "json_schema" else ('{"type": "object"}', False)
    ebnf = str(xgrammar.Grammar.from_json_schema(
        schema, any_whitespace=spec.any_whitespace, separators=None if spec.any_whitespace else (", ", ": "),
        max_whitespace_cnt=MAX_JSON_WHITESPACE if spec.any_whitespace else None, strict_mode=strict))
    # xgrammar 0.2 lowers a string with minLength/maxLength to a bounded repeat of this class, which lets raw
    # control characters in: invalid JSON (mlc-ai/xgrammar#800). Keep them out. Escapes stay unavailable in such
    # strings, as in xgrammar: allowing them (a choice inside the repeat) made each mask ~200x slower.
    return ebnf.replace(_BOUNDED_STRING_CHAR, _PLAIN_JSON_STRING_CHAR)


_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_PLAIN_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'

_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _reason(error: Exception) -> str:
    """The grammar engine's message without its C++ source location."""
    return _LOCATION.sub("", str(error).strip()).strip().splitlines()[0] if str(error).strip() else type(error).__name__
