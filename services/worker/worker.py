"""The worker role: model weights, the physical KV tensors, the attention backend and the sampler.

Each step it takes a StepPlan (deltas only; it keeps each request's tokens and block table itself), lays the
scheduled tokens out as one flat ragged batch, runs one forward pass, samples, and returns the tokens.

Under tensor parallelism (tensor_parallel.py) every rank is a Worker holding its shard and its heads' part of
the KV cache. Rank 0 takes the plan and broadcasts it; the others wait for it in follow(). All ranks run the
same forward pass; rank 0 alone samples (the logits are gathered there, so one sampler with one set of seeded
generators decides, with no need to keep N of them in step) and broadcasts the sampled ids, which every rank
appends to its copy of the request's tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tessera.worker.attention import int8_kv
from tessera.worker.attention.backend import AttentionBackend, AttentionMetadata
from tessera.worker.checkpoint import load_model
from tessera.worker.device import attention_backend_for, default_dtype_for, resolve_device
from tessera.worker.host_allocator import keep_large_allocations_in_heap
from tessera.model_config import ModelConfig
from tessera.worker.models.int8_linear import QUANTIZATIONS, quantize_linear_layers
from tessera.worker.models.fused_ops import native_decode_layers, native_decoder
from tessera.worker.models.packed_linear import (GEMV_ROWS, native_bf16_batches, pack_linear_layers, resolve_cpu_matmul,
                                                 use_gemv)
from tessera.worker.sampler import Sampler, SamplingRow, plain_greedy, top_logprobs
from tessera.worker.tensor_parallel import SINGLE, TensorParallel
from tessera.sampling_params import InvalidParam, SamplingParams
from tessera.step import StepPlan, StepResult, TokenLogprobs

log = logging.getLogger("tessera.worker")


@dataclass
class WorkerConfig:
    model: str
    # None: the checkpoint's own on CPU, bfloat16 on CUDA; auto (the CLI's default) also bf16 on CPUs that have it
    dtype: str | None = None
    device: str = "cpu"  # auto, cpu, cuda, tpu (see device.py)
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes of KV tensors; the block count follows from it
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests use few blocks to force preemption)
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    # CPU linear layers: onednn (pre-packed weights) or aten; auto: onednn where it runs, native bf16 where oneDNN
    # cannot run bf16
    cpu_matmul: str = "auto"
    quantization: str | None = None  # CPU: "int8" linear layers (models/int8_linear.py)
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; int8: per-row scales (attention/int8_kv.py), CPU only
    tensor_parallel_size: int = 1  # ranks sharing the model (tensor_parallel.py); this one is $RANK
    collective_timeout: float = 60.0  # seconds a rank waits at a collective before the group counts as broken


RESET = "reset"  # what rank 0 broadcasts instead of a plan when the engine reconnects
KEEPALIVE = "keepalive"  # ... and when no step has run for a while


@dataclass
class _RequestState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


class Worker:
    def __init__(self, config: WorkerConfig, attn_backend: AttentionBackend | None = None,
                 tp: TensorParallel = SINGLE):
        self.tp = tp
        self.device = resolve_device(config.device)
        self.attn_backend = attn_backend or attention_backend_for(self.device)
        dtype = config.dtype
        if dtype in (None, "auto"):
            checkpoint_dtype = ModelConfig.from_pretrained(config.model).dtype
            dtype = default_dtype_for(self.device, checkpoint_dtype, auto=config.dtype == "auto")
            if dtype is not None and dtype != checkpoint_dtype:
                name, ours = str(checkpoint_dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")
                why = "this CPU has native bf16 (AVX512-BF16 or AMX)" if self.device.type == "cpu" else self.device.type
                log.info("serving the %s checkpoint in %s: %s; --dtype %s keeps %s", name, ours, why, name, name)
        self.model, self.model_config = load_model(config.model, self.attn_backend, dtype, self.device, tp)
        mc: ModelConfig = self.model_config
        if self.device.type == "cpu":
            keep_large_allocations_in_heap()
        self.quantization = config.quantization
        if mc.int8_checkpoint is not None:  # int8 ahead of time: only the int8 layers can run it
            if self.quantization not in (None, "int8"):
                raise ValueError(f"quantization: {self.quantization!r}, but {config.model} is an int8 checkpoint "
                                 "(compressed-tensors W8A8): leave --quantization out, or say int8")
            log.info("int8 checkpoint (compressed-tensors W8A8): its int8 weights and scales are served as stored")
            self.quantization = "int8"
        if self.quantization is not None:
            if self.quantization not in QUANTIZATIONS:
                raise ValueError(f"quantization: {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
            if self.device.type != "cpu":
                raise ValueError(f"quantization {self.quantization} runs on the CPU only (device {self.device.type})")
            log.info("int8: %d linear layers quantized (weights per channel, activations per token)",
                     quantize_linear_layers(self.model))
            self.cpu_matmul = "int8"
        else:
            self.cpu_matmul = resolve_cpu_matmul(config.cpu_matmul, self.device, mc.dtype)
        if self.cpu_matmul == "onednn":
            gemv = use_gemv(self.model, config.cpu_matmul)
            log.info("oneDNN matmuls: %d linear layers packed%s", pack_linear_layers(self.model, gemv),
                     f"; up to {GEMV_ROWS} rows on the native GEMV's copy" if gemv else "")
        elif self.cpu_matmul == "aten" and config.cpu_matmul == "auto" and self.device.type == "cpu" \
                and native_bf16_batches(mc.dtype):
            # oneDNN cannot run bf16 here (no AVX-512): the native kernels, every batch size on one packed copy
            self.cpu_matmul = "native"
            log.info("native bf16 matmuls (oneDNN cannot run bf16 on this CPU): %d linear layers packed",
                     pack_linear_layers(self.model, batches="native"))
        if self.device.type == "cpu" and hasattr(self.model, "native_layers"):
            self.model.native_layers = native_decode_layers(self.model)
        self.block_size = config.block_size
        kv_heads = self.model.layers[0].self_attn.num_kv_heads  # this rank's
        kv_dtype, row = self._kv_cache_layout(config.kv_cache_dtype, mc)
        bytes_per_block = 2 * mc.num_hidden_layers * kv_heads * row * kv_dtype.itemsize * config.block_size
        # One block table for all ranks: the count every rank's budget holds.
        self.num_blocks = tp.min_int(config.num_kv_blocks or max(config.kv_cache_memory // bytes_per_block, 1))
        shape = self.attn_backend.kv_cache_shape(self.num_blocks, self.block_size, kv_heads, row)
        self.kv_caches = [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(mc.num_hidden_layers)]
        # Decode steps of up to GEMV_ROWS requests from the token ids to the logits in one native call.
        self.native_decoder = native_decoder(self.model, self.kv_caches)
        if self.native_decoder is not None:
            log.info("decode steps of up to %d requests: one native call from the token ids to the logits", GEMV_ROWS)
        elif getattr(self.model, "native_layers", None) is not None:
            log.info("decode steps of up to %d requests: each layer one native call", GEMV_ROWS)
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %s backend)",
            self.num_blocks, self.block_size, self.num_blocks * self.block_size,
            self.num_blocks * bytes_per_block / 2**20,
            "int8 with a float32 scale per token and head" if kv_dtype == torch.int8 else mc.dtype,
            self.attn_backend.name,
        )
        self.sampler = Sampler(mc.vocab_size, mc.eos_token_ids)
        self.requests: dict[str, _RequestState] = {}
        self.cuda_graphs = None
        graphs_ok = getattr(self.attn_backend, "supports_cuda_graphs", False)
        if self.device.type == "cuda" and graphs_ok and not config.enforce_eager and tp.size == 1:
            from tessera.worker.cuda_graphs import CudaGraphRunner

            self.cuda_graphs = CudaGraphRunner(self.model, self.kv_caches, self.block_size, mc.max_model_len)
            self.cuda_graphs.capture()
            log.info("CUDA graphs captured for decode batch sizes %s", self.cuda_graphs.batch_sizes)

    def _kv_cache_layout(self, choice: str, mc) -> tuple[torch.dtype, int]:
        """The KV cache's element dtype and elements per row of one head."""
        if choice in ("auto", None):
            return mc.dtype, mc.head_dim
        if choice != "int8":
            raise ValueError(f"kv_cache_dtype: {choice!r} is not one of auto, int8")
        if self.attn_backend.name != "torch" or self.device.type != "cpu":
            raise ValueError(f"kv_cache_dtype int8 runs on the CPU's PyTorch attention only (device "
                             f"{self.device.type}, {self.attn_backend.name} backend)")
        return torch.int8, int8_kv.row_width(mc.head_dim)

    def check_plan(self, plan: StepPlan) -> None:
        """InvalidParam for a plan that no engine sends, before it changes anything: a worker process serves
        whoever connects, and the plan indexes its tensors. Every id, token and block in range; every scheduled
        token within its request's tokens and block table; at most one KV slot's worth of tokens per step."""
        mc = self.model_config
        gone, new = set(plan.finished_request_ids), {r.request_id: r for r in plan.new_requests}

        def blocks_ok(field: str, block_ids) -> None:
            bad = next((b for b in block_ids if not 0 <= b < self.num_blocks), None)
            if bad is not None:
                raise InvalidParam(field, f"block {bad} is outside the KV cache [0, {self.num_blocks})")

        for request_id, r in new.items():
            field = f"plan.new_requests[{request_id[:64]!r}]"
            if not 0 < len(r.token_ids) <= mc.max_model_len:
                raise InvalidParam(field, f"{len(r.token_ids)} tokens; 1 to max_model_len {mc.max_model_len} fit")
            if next((t for t in r.token_ids if not 0 <= t < mc.vocab_size), None) is not None:
                raise InvalidParam(field, f"a token id outside the vocabulary [0, {mc.vocab_size})")
            if not (0 < r.num_prompt_tokens <= len(r.token_ids) and r.num_computed_tokens <= len(r.token_ids)):
                raise InvalidParam(field, "num_prompt_tokens and num_computed_tokens must be within token_ids")
            blocks_ok(field, r.block_ids)
            r.params.validate(mc.vocab_size, max_logprobs=mc.vocab_size)
        for request_id, block_ids in plan.new_block_ids.items():
            if request_id not in new and (request_id not in self.requests or request_id in gone):
                raise InvalidParam("plan.new_block_ids", f"request {request_id[:64]!r} is not known to this worker")
            blocks_ok("plan.new_block_ids", block_ids)
        for request_id, num_tokens in plan.num_scheduled_tokens.items():
            field = f"plan.num_scheduled_tokens[{request_id[:64]!r}]"
            state = new.get(request_id) or (self.requests.get(request_id) if request_id not in gone else None)
            if state is None:
                raise InvalidParam(field, "not a request known to this worker")
            end = state.num_computed_tokens + num_tokens
            num_blocks = len(state.block_ids) + len(plan.new_block_ids.get(request_id, ()))
            if num_tokens < 1 or end > len(state.token_ids) or end > num_blocks * self.block_size:
                raise InvalidParam(field, f"{num_tokens} tokens from {state.num_computed_tokens}: past the "
                                          f"request's {len(state.token_ids)} tokens or its {num_blocks} blocks")
        if plan.total_tokens > self.num_blocks * self.block_size:
            raise InvalidParam("plan.num_scheduled_tokens", f"{plan.total_tokens} tokens in one step; the KV cache "
                                                            f"holds {self.num_blocks * self.block_size}")
        words = (mc.vocab_size + 31) // 32
        for request_id, mask in plan.token_masks.items():
            if mask.numel() != words:
                raise InvalidParam(f"plan.token_masks[{request_id[:64]!r}]",
                                   f"{mask.numel()} words; the vocabulary needs {words}")

    def _apply_plan(self, plan: StepPlan) -> None:
        """Brings the cached request state up to date with the plan's deltas."""
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            self.requests[new.request_id] = _RequestState(
                list(new.token_ids), new.num_prompt_tokens, new.params, list(new.block_ids), new.num_computed_tokens
            )
        for request_id, block_ids in plan.new_block_ids.items():
            self.requests[request_id].block_ids.extend(block_ids)

    @property
    def tensor_parallel_size(self) -> int:
        return self.tp.size

    def execute(self, plan: StepPlan) -> StepResult:
        """On rank 0 (the only rank an engine talks to): the step on every rank."""
        return self._execute(self.tp.broadcast_object(plan))

    def keepalive(self) -> None:
        """Rank 0, while idle: the other ranks wait for the next plan at a collective, which would time out."""
        self.tp.broadcast_object(KEEPALIVE)

    def reset(self) -> None:
        """Forget every request, on every rank (a new engine connection starts from nothing)."""
        self.tp.broadcast_object(RESET)
        self.requests.clear()

    def follow(self) -> None:
        """Ranks other than 0: run each step rank 0 broadcasts, until it broadcasts None (shutdown)."""
        while (plan := self.tp.broadcast_object()) is not None:
            if plan == RESET:
                self.requests.clear()
            elif plan != KEEPALIVE:
                self._execute(plan)

    def stop_followers(self) -> None:
        if self.tp.size > 1:
            self.tp.broadcast_object(None)

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> StepResult:
        self._apply_plan(plan)
        if not plan.num_scheduled_tokens:
            return StepResult()

        # Decodes first, shortest context first: backends batch single-token queries in groups of similar length.
        scheduled = sorted(
            plan.num_scheduled_tokens.items(),
            key=lambda item: (item[1] != 1, self.requests[item[0]].num_computed_tokens if item[1] == 1 else 0),
        )
        states = [self.requests[request_id] for request_id, _ in scheduled]
        input_ids, positions, request_index, query_lens, seq_lens = [], [], [], [], []
        for i, ((_, num_new), state) in enumerate(zip(scheduled, states)):
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_new
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            request_index.extend([i] * num_new)
            query_lens.append(num_new)
            seq_lens.append(end)
        meta = self._metadata(states, positions, request_index, query_lens, seq_lens)

        # Which rows need logits: the last token of each request that completes its context (to sample), and
        # every prompt position of a chunk whose request asked for prompt logprobs.
        sample_rows, sampling, prompt_rows, prompt_targets = [], [], [], []
        offset = 0
        for (request_id, num_new), state in zip(scheduled, states):
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_new
            if state.params.prompt_logprobs is not None:
                for position in range(start, min(end, state.num_prompt_tokens - 1)):
                    prompt_rows.append(offset + position - start)
                    prompt_targets.append((request_id, state.token_ids[position + 1]))
            if end >= len(state.token_ids):
                sample_rows.append(offset + num_new - 1)
                sampling.append((request_id, state))
            offset += num_new
            state.num_computed_tokens = end

        result = StepResult()
        if (self.native_decoder is not None and len(sample_rows) == meta.num_decodes == len(input_ids) <= GEMV_ROWS
                and not prompt_rows):  # a few decodes, each sampled: from the token ids to the logits in one call
            step = (self._tensor(input_ids), self._tensor(positions), meta.block_tables, meta.seq_lens,
                    meta.slot_mapping)
            if self._all_plain_greedy(sampling, plan.token_masks):
                self._take(sampling, self.native_decoder.greedy_step(*step, self.sampler.vocab_size).tolist(), result)
            else:
                self._sample(self.native_decoder.step(*step), sampling, result, plan.token_masks)
            return result
        if self.cuda_graphs is not None and self.cuda_graphs.fits(meta):
            hidden = self.cuda_graphs.run(self._tensor(input_ids), self._tensor(positions), meta)
        else:
            hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_caches, meta)
        if not (sample_rows or prompt_rows):  # a prefill chunk that samples nothing: no logits (on every rank)
            return result
        greedy = not prompt_rows and self._all_plain_greedy(sampling, plan.token_masks)  # an argmax, any dtype
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows + prompt_rows)], float32=not greedy)
        if logits is None:  # a rank other than 0: take rank 0's tokens
            for (_, state), token_id in zip(sampling, self.tp.broadcast_ids([0] * len(sampling)), strict=True):
                state.token_ids.append(token_id)
            return result
        if sampling:
            self._sample(logits[: len(sample_rows)], sampling, result, plan.token_masks)
            self.tp.broadcast_ids([result.sampled_token_ids[request_id] for request_id, _ in sampling])
        if prompt_rows:
            self._prompt_logprobs(logits[len(sample_rows) :], prompt_targets, result)
        return result

    def _sample(self, logits: torch.Tensor, sampling: list, result: StepResult,
                token_masks: dict[str, torch.Tensor] | None = None) -> None:
        if self._all_plain_greedy(sampling, token_masks):  # no per-row state for the sampler to build
            self._take(sampling, self.sampler.greedy(logits), result)
            return
        rows = [
            SamplingRow(
                state.params,
                # Only the repetition penalty reads the prompt: spare the copy otherwise.
                state.token_ids[: state.num_prompt_tokens] if state.params.repetition_penalty != 1.0 else (),
                state.token_ids[state.num_prompt_tokens :],
            )
            for _, state in sampling
        ]
        masks = self._stack_masks(sampling, token_masks or {})
        out = self.sampler(logits, rows, masks.to(logits.device) if masks is not None else None)
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_values = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, (request_id, state) in enumerate(sampling):
            state.token_ids.append(token_ids[i])
            result.sampled_token_ids[request_id] = token_ids[i]
            n = state.params.logprobs
            if n is not None:
                top = list(zip(top_ids[i][:n], top_values[i][:n])) if n else []
                result.logprobs[request_id] = TokenLogprobs(token_ids[i], logprobs[i], top)

    @staticmethod
    def _all_plain_greedy(sampling: list, token_masks: dict[str, torch.Tensor] | None) -> bool:
        """Whether each row's pick is its logits' argmax: no masks, no logprobs, nothing that changes the logits."""
        return not token_masks and all(
            state.params.logprobs is None and plain_greedy(state.params, len(state.token_ids) - state.num_prompt_tokens)
            for _, state in sampling)

    @staticmethod
    def _take(sampling: list, token_ids: list[int], result: StepResult) -> None:
        for (request_id, state), token_id in zip(sampling, token_ids, strict=True):
            state.token_ids.append(token_id)
            result.sampled_token_ids[request_id] = token_id

    def _stack_masks(self, sampling: list, token_masks: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """One bitmask row per sampled request, all bits set for the unconstrained ones; None if none is."""
        if not token_masks:
            return None
        words = (self.model_config.vocab_size + 31) // 32
        masks = torch.full((len(sampling), words), -1, dtype=torch.int32)
        for i, (request_id, _) in enumerate(sampling):
            mask = token_masks.get(request_id)
            if mask is not None:
                if mask.numel() != words:
                    raise ValueError(f"request {request_id}: a token mask of {mask.numel()} words; "
                                     f"the vocabulary needs {words}")
                masks[i] = mask
        return masks

    def _prompt_logprobs(self, logits: torch.Tensor, targets: list[tuple[str, int]], result: StepResult) -> None:
        log_probs = torch.log_softmax(logits, dim=-1)
        targets_t = torch.tensor([t for _, t in targets], device=logits.device)
        chosen = log_probs.gather(1, targets_t.unsqueeze(1)).squeeze(1).tolist()
        k = max(self.requests[request_id].params.prompt_logprobs for request_id, _ in targets)
        top_ids, top_values = top_logprobs(logits, k) if k else (None, None)
        for i, (request_id, token_id) in enumerate(targets):
            n = self.requests[request_id].params.prompt_logprobs
            top = list(zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist())) if n else []
            result.prompt_logprobs.setdefault(request_id, []).append(TokenLogprobs(token_id, chosen[i], top))

    def _metadata(self, states, positions, request_index, query_lens, seq_lens) -> AttentionMetadata:
        max_blocks = max(len(state.block_ids) for state in states)
        # Built on the host, so that the slot mapping does not wait on a copy back from the device.
        rows = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in states]
        block_tables = torch.tensor(rows, dtype=torch.int32)
        bs = self.block_size
        if len(positions) == len(states):  # decodes only: a slot each, cheaper in Python than as five tensor ops
            slot_mapping = torch.tensor([s.block_ids[p // bs] * bs + p % bs for s, p in zip(states, positions)])
        else:
            positions_t = torch.tensor(positions, dtype=torch.long)
            request_index_t = torch.tensor(request_index, dtype=torch.long)
            block_of_token = block_tables[request_index_t, positions_t // bs].to(torch.long)
            slot_mapping = block_of_token * bs + positions_t % bs
        query_start_loc = [0]
        for q in query_lens:
            query_start_loc.append(query_start_loc[-1] + q)
        return AttentionMetadata(
            query_start_loc=self._tensor(query_start_loc, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=block_tables.to(self.device),
            slot_mapping=slot_mapping.to(self.device),
            num_decodes=sum(1 for q in query_lens if q == 1),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
