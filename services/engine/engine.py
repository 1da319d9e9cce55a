"""The engine: a scheduler and a logical KV cache driving one worker, a step at a time.

`LLMEngine` is synchronous and single-threaded: add requests, call `step()`, read the outputs. `generate()` is
the blocking batch helper tests and benchmarks use. `engine_loop.EngineLoop` runs it on a thread for streaming.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from tessera.engine.kv_cache_manager import KVCacheManager
from tessera.engine.request import FinishReason, Request, RequestOutput, Usage
from tessera.engine.scheduler import Scheduler, SchedulerConfig, usage_of
from tessera.engine.structured_output import CompiledConstraint, GrammarCompiler, StructuredOutput
from tessera.model_config import ModelConfig
from tessera.sampling_params import InvalidParam, SamplingParams
from tessera.step import StepPlan, StepResult, TokenLogprobs

log = logging.getLogger("tessera.engine")


class WorkerClient(Protocol):
    """What the engine needs of a worker: the in-process Worker, or a remote one over gRPC."""

    model_config: ModelConfig
    num_blocks: int
    block_size: int

    def execute(self, plan: StepPlan) -> StepResult: ...


@dataclass
class EngineConfig:
    model: str
    dtype: str | None = None
    device: str | None = "cpu"  # None: $TESSERA_DEVICE, else auto
    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int | None = None  # None: the model's own
    enable_prefix_caching: bool = True
    max_logprobs: int = 20
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    cpu_matmul: str = "auto"  # CPU linear layers: onednn, aten, or auto (see worker/models/packed_linear.py)
    structured_output_timeout: float = 10.0  # seconds a constraint may take to compile before it is refused
    quantization: str | None = None  # CPU: "int8" linear layers (see worker/models/int8_linear.py)
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; int8 (CPU): see worker/attention/int8_kv.py
    tensor_parallel_size: int = 1  # > 1: the model sharded over that many worker processes (worker_group.py)


@dataclass
class Completion:
    """A finished request, as the blocking helper returns it."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, worker: WorkerClient | None = None):
        self.config = config
        if worker is None and config.tensor_parallel_size > 1:
            from tessera.engine.worker_group import LocalWorkerGroup

            worker = LocalWorkerGroup(config)
        elif worker is None:
            from tessera.engine.local_worker import make_local_worker

            worker = make_local_worker(config)
        self.worker = worker
        self.model_config = self.worker.model_config
        max_model_len = min(config.max_model_len or self.model_config.max_model_len, self.model_config.max_model_len)
        kv_tokens = self.worker.num_blocks * self.worker.block_size
        if kv_tokens < max_model_len:  # a longer request could never fit: it would wait (or preempt) forever
            log.warning("the KV cache holds %d tokens, fewer than the model's length %d: requests are limited to %d "
                        "tokens (give it more memory with --kv-cache-memory)", kv_tokens, max_model_len, kv_tokens)
            max_model_len = kv_tokens
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(self.worker.num_blocks, self.worker.block_size, config.enable_prefix_caching)
        mc = self.model_config
        # The engine's own --model directory holds the tokenizer (a remote worker's path may not exist here).
        self.grammars = GrammarCompiler(config.model, mc.vocab_size, mc.eos_token_ids,
                                        config.structured_output_timeout)
        scheduler_config = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, max_model_len)
        self.scheduler = Scheduler(scheduler_config, self.kv, mc.eos_token_ids, self.grammars.words)

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        structured_output: StructuredOutput | CompiledConstraint | None = None,
    ) -> str:
        """Validates and queues a request; raises InvalidParam naming the field on bad input. A structured output
        is compiled here (blocking, cached) unless it comes compiled."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        self.validate(prompt_token_ids, params)
        if request_id in self.scheduler.requests:
            raise InvalidParam("request_id", f"{request_id!r} is already running")
        if isinstance(structured_output, StructuredOutput):
            structured_output = self.grammars.compile(structured_output)
        self.scheduler.add(self.new_request(request_id, prompt_token_ids, params, priority, structured_output))
        return request_id

    @staticmethod
    def new_request(request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, priority: int = 0,
                    constraint: CompiledConstraint | None = None) -> Request:
        matcher = constraint.matcher() if constraint is not None else None
        return Request(request_id, list(prompt_token_ids), params, priority, matcher=matcher)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        vocab_size = self.model_config.vocab_size
        if not prompt_token_ids:
            raise InvalidParam("prompt_token_ids", "must not be empty")
        if len(prompt_token_ids) >= self.max_model_len:  # before looking at each id: bounded work
            raise InvalidParam(
                "prompt_token_ids",
                f"the prompt has {len(prompt_token_ids)} tokens; the model allows at most {self.max_model_len - 1}",
                out_of_range=True,
            )
        for token_id in prompt_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidParam("prompt_token_ids", f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
        params.validate(vocab_size, self.config.max_logprobs)
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidParam(
                "stopping.max_tokens",
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"maximum length {self.max_model_len}",
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request at once and frees its KV blocks; returns its final output, or None if unknown."""
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        return RequestOutput(request_id, finish_reason=FinishReason.ABORT, usage=usage_of(request))

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.num_scheduled_tokens and not plan.finished_request_ids:
            return []
        result = self.worker.execute(plan)
        return self.scheduler.update(plan, result)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
        structured_output: StructuredOutput | Sequence[StructuredOutput | None] | None = None,
    ) -> list[Completion]:
        """Runs a batch to completion and returns the completions in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if structured_output is None or isinstance(structured_output, StructuredOutput):
            structured_output = [structured_output] * len(prompts)
        ids = [self.add_request(prompt, p, structured_output=s)
               for prompt, p, s in zip(prompts, params, structured_output)]
        completions: dict[str, Completion] = {}
        partial = {request_id: ([], []) for request_id in ids}
        prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                tokens, logprobs = partial[out.request_id]
                tokens.extend(out.new_token_ids)
                logprobs.extend(out.new_logprobs)
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                if out.finished:
                    completions[out.request_id] = Completion(
                        out.request_id, tokens, out.finish_reason, out.usage, logprobs, prompt_logprobs.get(out.request_id)
                    )
        return [completions[request_id] for request_id in ids]

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_in_use": self.kv.num_blocks_in_use,
            "kv_blocks_total": self.kv.num_blocks,
            "prefix_cache_hit_rate": self.kv.stats.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
        }
