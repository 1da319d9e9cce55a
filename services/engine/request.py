"""A generation request as the engine sees it: its tokens, how many of them the KV cache holds, and its fate."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from tessera.sampling_params import SamplingParams
from tessera.step import TokenLogprobs

_arrival_counter = itertools.count()


class FinishReason(enum.Enum):
    STOP = "stop"  # an EOS or stop token, or a structured output's grammar is complete
    LENGTH = "length"  # max_tokens or the model's maximum length
    ABORT = "abort"  # the client cancelled, or the server aborted it


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first; ties go by arrival
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    token_ids: list[int] = field(init=False)  # prompt + output, the sequence the KV cache covers
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Structured output: the request's own grammar matcher (xgrammar), advanced by every output token. It
    # outlives preemption: the recompute only rebuilds the KV cache, the output so far stays accepted.
    matcher: object | None = None

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class RequestOutput:
    """What one step produced for one request: the streaming unit of the in-process API."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)  # parallel to new_token_ids when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None  # sent once, with the first token
    finish_reason: FinishReason | None = None
    usage: Usage | None = None  # with the last output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merged(self, later: "RequestOutput") -> "RequestOutput":
        """This output followed by a later one of the same request, as one (for a consumer that fell behind)."""
        return RequestOutput(
            self.request_id,
            self.new_token_ids + later.new_token_ids,
            self.new_logprobs + later.new_logprobs,
            self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
            later.finish_reason,
            later.usage,
        )
