"""Per-request sampling and stopping options, validated once at the door.

Validation raises `InvalidParam`, which names the offending field so the gRPC layer can turn it into an
INVALID_ARGUMENT status that tells the client exactly what to fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


class InvalidParam(ValueError):
    """A request field is out of range. `field` is the dotted name a client would recognise."""

    def __init__(self, field: str, message: str, out_of_range: bool = False):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.out_of_range = out_of_range


@dataclass
class SamplingParams:
    # sampling
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # (0, 1]
    top_k: int = 0                    # 0 or -1 = disabled
    min_p: float = 0.0                # [0, 1]
    seed: int | None = None           # same seed, same tokens, whatever else is in the batch
    repetition_penalty: float = 1.0   # > 0; applies to prompt and output tokens (HF semantics)
    presence_penalty: float = 0.0     # [-2, 2]; output tokens only (OpenAI semantics)
    frequency_penalty: float = 0.0    # [-2, 2]; output tokens only
    logit_bias: dict[int, float] = field(default_factory=dict)
    # stopping
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # output
    logprobs: int | None = None        # top-N logprobs per generated token (0 = only the chosen token)
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token (the first has none)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int, max_logprobs: int = 20) -> None:
        def bad(name: str, msg: str) -> None:
            raise InvalidParam(f"{name}", msg)

        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad("sampling.temperature", f"must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            bad("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad("sampling.top_k", f"must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            bad("sampling.min_p", f"must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("sampling.repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (-2.0 <= value <= 2.0):
                bad(f"sampling.{name}", f"must be in [-2, 2], got {value}")
        for token_id, bias in self.logit_bias.items():
            if not (0 <= token_id < vocab_size):
                bad("sampling.logit_bias", f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
            if not math.isfinite(bias):
                bad("sampling.logit_bias", f"bias for token {token_id} must be finite")
        if self.max_tokens < 1:
            bad("stopping.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            bad("stopping.min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for token_id in self.stop_token_ids:
            if not (0 <= token_id < vocab_size):
                bad("stopping.stop_token_ids", f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (0 <= value <= max_logprobs):
                bad(f"output.{name}", f"must be in [0, {max_logprobs}], got {value}")
