"""The step contract: the one thing the engine role (scheduler, logical KV) and the worker role (model,
physical KV) share, and the only part of the worker's side the engine imports.

Each step the engine sends a StepPlan holding only deltas: a request's tokens and parameters travel once, when
it is new to the worker (or resumes after preemption); after that only its new block ids do, and the worker
keeps the rest. The worker answers with a StepResult. In-process they are passed as these dataclasses; to a
worker process they travel as tessera.worker.v1 messages, converted field by field at the end of this module.
Round trips are exact: floats travel as float32, and the worker computes every logprob in float32, so logprobs
arrive bit for bit; sampling parameters arrive rounded to float32, which changes nothing because the sampler
turns them into float32 tensors anyway.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from tessera.sampling_params import InvalidParam, SamplingParams
from tessera.worker.v1 import worker_pb2 as pb


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
    # Structured output: the allowed next tokens of each constrained request that samples this step, a bitset
    # over the vocabulary (int32 words; bit j of word i allows token 32 * i + j).
    token_masks: dict[str, torch.Tensor] = field(default_factory=dict)

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


# -- the wire form (tessera.worker.v1) -------------------------------------------------------------------

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name  # "tessera.worker.v1.Worker"

_PARAM_FIELDS = [f.name for f in fields(SamplingParams)]
_OPTIONAL_PARAMS = ("seed", "logprobs", "prompt_logprobs")  # proto3 `optional`: unset is None


# -- sampling parameters ----------------------------------------------------------------------------------

def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    # The message has the dataclass's field names; None leaves an optional field unset.
    return pb.SamplingParams(**{name: getattr(params, name) for name in _PARAM_FIELDS})


def params_from_proto(message: pb.SamplingParams) -> SamplingParams:
    values = {name: getattr(message, name) for name in _PARAM_FIELDS}
    for name in _OPTIONAL_PARAMS:
        if not message.HasField(name):
            values[name] = None
    values["logit_bias"] = dict(message.logit_bias)
    values["stop_token_ids"] = list(message.stop_token_ids)
    return SamplingParams(**values)


# -- step plan --------------------------------------------------------------------------------------------

def plan_to_proto(plan: StepPlan) -> pb.StepPlan:
    return pb.StepPlan(
        new_requests=[
            pb.NewRequest(
                request_id=new.request_id,
                token_ids=new.token_ids,
                num_prompt_tokens=new.num_prompt_tokens,
                params=params_to_proto(new.params),
                block_ids=new.block_ids,
                num_computed_tokens=new.num_computed_tokens,
            )
            for new in plan.new_requests
        ],
        new_block_ids=[pb.RequestBlockIds(request_id=r, block_ids=b) for r, b in plan.new_block_ids.items()],
        # Repeated, not a map: the order is the engine's, and the worker's batch layout follows it.
        num_scheduled_tokens=[
            pb.ScheduledTokens(request_id=r, num_tokens=n) for r, n in plan.num_scheduled_tokens.items()
        ],
        finished_request_ids=plan.finished_request_ids,
        # Little-endian int32 words, as the tensors hold them on every host we run on.
        token_masks=[pb.TokenMask(request_id=r, bitmask=m.numpy().astype("<i4").tobytes())
                     for r, m in plan.token_masks.items()],
    )


def plan_from_proto(message: pb.StepPlan) -> StepPlan:
    return StepPlan(
        new_requests=[
            NewRequest(
                request_id=new.request_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                params=params_from_proto(new.params),
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
            )
            for new in message.new_requests
        ],
        new_block_ids={entry.request_id: list(entry.block_ids) for entry in message.new_block_ids},
        num_scheduled_tokens={entry.request_id: entry.num_tokens for entry in message.num_scheduled_tokens},
        finished_request_ids=list(message.finished_request_ids),
        token_masks={entry.request_id: _mask_from_proto(entry) for entry in message.token_masks},
    )


def _mask_from_proto(entry: pb.TokenMask) -> torch.Tensor:
    # Whole words only (torch.frombuffer refuses the rest, and an empty buffer): a client's error, not ours.
    if not entry.bitmask or len(entry.bitmask) % 4:
        raise InvalidParam(f"plan.token_masks[{entry.request_id[:64]!r}]",
                           f"{len(entry.bitmask)} bytes is not a whole number of 32-bit words")
    return torch.frombuffer(bytearray(entry.bitmask), dtype=torch.int32)


# -- step result ------------------------------------------------------------------------------------------

def _logprobs_to_proto(entry: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=entry.token_id,
        logprob=entry.logprob,
        top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in entry.top],
    )


def _logprobs_from_proto(message: pb.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(message.token_id, message.logprob, [(t.token_id, t.logprob) for t in message.top_logprobs])


def result_to_proto(result: StepResult) -> pb.StepResult:
    # A sampled token carries its logprobs (the worker only reports logprobs for tokens it sampled).
    return pb.StepResult(
        sampled=[
            pb.SampledToken(
                request_id=request_id,
                token_id=token_id,
                logprob=_logprobs_to_proto(result.logprobs[request_id]) if request_id in result.logprobs else None,
            )
            for request_id, token_id in result.sampled_token_ids.items()
        ],
        prompt_logprobs=[
            pb.PromptLogprobs(request_id=request_id, logprobs=[_logprobs_to_proto(e) for e in entries])
            for request_id, entries in result.prompt_logprobs.items()
        ],
    )


def result_from_proto(message: pb.StepResult) -> StepResult:
    result = StepResult()
    for sampled in message.sampled:
        result.sampled_token_ids[sampled.request_id] = sampled.token_id
        if sampled.HasField("logprob"):
            result.logprobs[sampled.request_id] = _logprobs_from_proto(sampled.logprob)
    for entry in message.prompt_logprobs:
        result.prompt_logprobs[entry.request_id] = [_logprobs_from_proto(e) for e in entry.logprobs]
    return result
