"""Continuous batching with a per-step token budget, vLLM V1 style.

Every request only has `num_computed_tokens` against `num_tokens`: a prefill chunk, a decode and a prefix-cache
hit are the same thing, "compute the next tokens of this sequence". Running requests are served first (decodes
cost one token each), then waiting ones are admitted while the budget, `max_num_seqs` and free KV blocks allow.
When blocks run out, the lowest-priority running request is preempted: its blocks are freed and it recomputes
from scratch later (its prefix blocks are usually still cached, so recompute is cheap).
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from tessera.engine.kv_cache_manager import KVCacheManager
from tessera.engine.request import FinishReason, Request, RequestOutput, RequestStatus, Usage
from tessera.step import NewRequest, StepPlan, StepResult

log = logging.getLogger("tessera.engine")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget per step
    max_num_seqs: int = 128  # requests running at once
    max_model_len: int = 2048  # prompt + output never exceeds this


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: list[int],
                 mask_words: int = 0):
        self.config = config
        self.mask_words = mask_words  # int32 words of a structured-output bitmask row (vocab_size / 32)
        self.kv = kv
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Request] = []  # sorted by (priority, arrival)
        self.running: list[Request] = []  # sorted by (priority, arrival); the last is preempted first
        self.requests: dict[str, Request] = {}
        self._forget: list[str] = []  # ids the worker must drop at the next step
        self.num_preemptions = 0

    # -- admission and removal -------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def abort(self, request_id: str) -> Request | None:
        """Removes the request at once, wherever it is, and frees its blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._finish(request, FinishReason.ABORT)
        return request

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self._forget.append(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv.free(request.request_id)
        del self.requests[request.request_id]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        self._forget.append(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        if request.num_output_tokens == 0:
            request.prompt_logprobs = []  # the recompute produces them again
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # -- one step --------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan(finished_request_ids=self._forget)
        self._forget = []
        budget = self.config.max_num_batched_tokens
        preempted = False

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new)
            while new_blocks is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_blocks = self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new)
            if new_blocks is None:
                break  # the request preempted itself: everything after it is already gone
            if new_blocks:
                plan.new_block_ids[request.request_id] = new_blocks
            plan.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new
            index += 1

        # New work only when nothing had to be preempted: admitting while evicting would thrash.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            request = self.waiting[0]
            # Prompt logprobs need the logits of every prompt position, so such requests skip the prefix cache.
            if request.params.prompt_logprobs is None:
                cached_blocks, num_cached = self.kv.get_computed_blocks(request.token_ids)
            else:
                cached_blocks, num_cached = [], 0
            num_new = min(request.num_tokens - num_cached, budget)
            block_ids = self.kv.allocate_slots(request.request_id, num_cached + num_new, cached_blocks)
            if block_ids is None:
                break
            self.waiting.pop(0)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                self.kv.stats.record(request.num_prompt_tokens, num_cached)
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            plan.new_requests.append(
                NewRequest(
                    request_id=request.request_id,
                    token_ids=list(request.token_ids),
                    num_prompt_tokens=request.num_prompt_tokens,
                    params=request.params,
                    block_ids=block_ids,
                    num_computed_tokens=num_cached,
                )
            )
            plan.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new
        self._fill_token_masks(plan)
        return plan

    def _fill_token_masks(self, plan: StepPlan) -> None:
        """The allowed next tokens of each constrained request that samples this step (it computes its last
        token); a prefill chunk short of that samples nothing and needs none."""
        sampling = [
            request for request_id, num_new in plan.num_scheduled_tokens.items()
            if (request := self.requests[request_id]).matcher is not None
            and request.num_computed_tokens + num_new >= request.num_tokens
        ]
        if not sampling:
            return
        masks = torch.empty((len(sampling), self.mask_words), dtype=torch.int32)
        for row, request in enumerate(sampling):
            request.matcher.fill_next_token_bitmask(masks, row)
            plan.token_masks[request.request_id] = masks[row]

    def update(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Applies the worker's result: advance computed counts, append tokens, check stops, emit outputs."""
        outputs = []
        for request_id, num_scheduled in plan.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            request.num_computed_tokens += num_scheduled
            self.kv.cache_blocks(request_id, request.token_ids, request.num_computed_tokens)
            if request_id in result.prompt_logprobs and request.num_output_tokens == 0:
                request.prompt_logprobs.extend(result.prompt_logprobs[request_id])
            token_id = result.sampled_token_ids.get(request_id)
            if token_id is None:
                continue
            output = RequestOutput(request_id, new_token_ids=[token_id])
            if request_id in result.logprobs:
                output.new_logprobs = [result.logprobs[request_id]]
            if request.num_output_tokens == 0 and request.params.prompt_logprobs is not None:
                output.prompt_logprobs = request.prompt_logprobs
            request.token_ids.append(token_id)
            reason = self._grammar_stop_reason(request, token_id) if request.matcher is not None else None
            reason = reason or self._stop_reason(request, token_id)
            if reason is not None:
                self._finish(request, reason)
                output.finish_reason = reason
                output.usage = usage_of(request)
            outputs.append(output)
        return outputs

    def _grammar_stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        """Advances the matcher. A complete grammar ends the request (its EOS was forced), whatever ignore_eos or
        min_tokens say: there is nothing left that the constraint allows."""
        if not request.matcher.accept_token(token_id):
            # The worker applies every mask before sampling, so this is a bug, not a client error.
            log.error("request %s: token %d breaks its structured output; aborting it", request.request_id, token_id)
            return FinishReason.ABORT
        return FinishReason.STOP if request.matcher.is_terminated() else None

    def _stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                return FinishReason.STOP
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None


def usage_of(request: Request) -> Usage:
    return Usage(
        prompt_tokens=request.num_prompt_tokens,
        completion_tokens=request.num_output_tokens,
        cached_tokens=max(request.num_cached_tokens, 0),
    )
