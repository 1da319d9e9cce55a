"""The narrow interface between the engine (scheduler, logical KV) and a worker (model, physical KV).

Each step the engine sends a StepPlan holding only deltas: a request's tokens and parameters travel once, when
it is new to the worker (or resumes after preemption); after that only its new block ids do, and the worker
keeps the rest. The worker answers with a StepResult. The same messages travel over tessera.worker.v1.Worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tessera.engine.sampling_params import SamplingParams


@dataclass
class NewRequest:
    request_id: str
    token_ids: list[int]  # the prompt, plus outputs so far when it resumes after preemption
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix hit)


@dataclass
class StepPlan:
    new_requests: list[NewRequest] = field(default_factory=list)
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)  # appended to known requests' tables
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # every request that runs this step
    finished_request_ids: list[str] = field(default_factory=list)  # finished, aborted or preempted: forget them

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely (token id, logprob), most likely first


@dataclass
class StepResult:
    # One entry for each request whose whole context is computed after this step (a decode, or the last prefill
    # chunk); a request in the middle of its prefill samples nothing.
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # only for requests that asked
    # Logprobs of the prompt tokens this step's chunk predicted, in prompt order (the first prompt token has none).
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
