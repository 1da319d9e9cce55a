"""The worker on torch-xla: the same StepPlan in, the same StepResult out, but every step padded to static shapes.

XLA compiles one graph per distinct shape, so a step's inputs are padded before they reach the device:
- tokens to a token bucket T and requests to a request bucket R (buckets.py): padded tokens are token 0 at
  position 0 and write their KV into the padding sink block (attention/xla_backend.py); padded requests have no
  tokens and an empty context;
- block tables to a fixed width, max_model_len / block_size blocks;
- the logits rows to R: one per request, the last token of its chunk.
One graph then runs the model, the logits and the sampler (xla/sampler.py) for each (T, R) pair, and `warm_up`
compiles all of them at start-up, with a progress bar.

Rows whose parameters need the host (penalties, logit bias, min_tokens not reached, prompt logprobs, more top
logprobs than the graph computes, a structured output's token mask) make the step use the "host" variant of its
graph, which also returns the logits of every token; the CPU Sampler then handles those rows, and the rest keep
their device samples. It is warmed up
too, so it costs nothing new after start-up, only the transfer of the logits in the steps that need it.

Compiled graphs persist in TESSERA_XLA_CACHE_PATH (default ~/.cache/tessera/xla_cache; empty disables). With
strict=True or TESSERA_XLA_STRICT=1 a step that compiles anything after warm-up raises instead of stalling quietly.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, replace

import torch

from tessera.worker.attention.xla_backend import XlaAttentionBackend, XlaAttentionMetadata
from tessera.step import StepPlan, StepResult, TokenLogprobs
from tessera.worker.worker import Worker, WorkerConfig, _RequestState
from tessera.worker.xla.buckets import padding_buckets, pick_bucket
from tessera.worker.xla.sampler import sample, seed_key

log = logging.getLogger("tessera.worker.xla")

DEFAULT_CACHE_PATH = "~/.cache/tessera/xla_cache"


@dataclass
class XlaConfig:
    # The scheduler's limits: the largest buckets. They must match the engine's (EngineConfig has the same fields).
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int | None = None  # fixes the block-table width; None: the model's
    min_token_bucket: int = 16
    min_request_bucket: int = 8
    padding_gap: int = 512  # buckets double up to it, then grow by it (buckets.py); <= 0: powers of two only
    max_logprobs: int = 20  # top logprobs the graph computes; a request asking for more samples on the host
    warm_up: bool = True  # compile every bucket when the worker starts
    cache_path: str | None = None  # None: $TESSERA_XLA_CACHE_PATH or DEFAULT_CACHE_PATH; "": no persistent cache
    strict: bool | None = None  # None: $TESSERA_XLA_STRICT == "1"


def xla_config_for(engine_config, **overrides) -> XlaConfig:
    """The XlaConfig whose largest buckets are the engine's scheduling limits."""
    limits = {name: getattr(engine_config, name) for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len")}
    return XlaConfig(**{**limits, **overrides})


def compile_counts() -> dict[str, float]:
    """New graphs (in-memory cache misses), real XLA compilations and their seconds, persistent-cache outcomes."""
    import torch_xla.debug.metrics as met

    compile_time = met.metric_data("CompileTime")  # (count, total ns, samples)
    counts = {"graphs": met.counter_value("UncachedCompile") or 0, "compiled": compile_time[0] if compile_time else 0,
              "compile_s": compile_time[1] / 1e9 if compile_time else 0.0}
    for name in ("PersistentCacheHit", "PersistentCacheMiss", "PersistentCacheDeserializeFailure"):
        counts[name] = met.counter_value(name) or 0
    return counts


def init_persistent_cache(path: str | None) -> str | None:
    """Points torch-xla's compilation cache at `path`; must run before the first computation of the process."""
    import torch_xla
    import torch_xla.runtime as xr

    if path is None:
        path = os.environ.get("TESSERA_XLA_CACHE_PATH", DEFAULT_CACHE_PATH)
    if not path:
        return None
    path = os.path.expanduser(path)
    if torch_xla._XLAC._xla_computation_cache_is_initialized():
        # A second worker in the same process: the first one's choice stands.
        log.warning("XLA compilation cache already initialized; %s not applied", path)
        return os.environ.get("XLA_PERSISTENT_CACHE_PATH")
    os.makedirs(path, exist_ok=True)
    xr.initialize_cache(path, readonly=False)
    return path


@dataclass
class _Batch:
    """One step's padded inputs, on the device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: XlaAttentionMetadata
    logits_indices: torch.Tensor  # [R]
    sampling: tuple[torch.Tensor, ...]  # temperature, top_k, top_p, min_p, keys: [R] each


class XlaWorker(Worker):
    def __init__(self, config: WorkerConfig, xla: XlaConfig | None = None):
        self.xla = xla = xla or XlaConfig()
        self.cache_path = init_persistent_cache(xla.cache_path)
        import torch_xla

        self._torch_xla = torch_xla
        super().__init__(replace(config, device="tpu"), XlaAttentionBackend())  # "tpu": the XLA device (device.py)
        mc = self.model_config
        self.strict = os.environ.get("TESSERA_XLA_STRICT") == "1" if xla.strict is None else xla.strict
        self.token_buckets = padding_buckets(xla.min_token_bucket, xla.max_num_batched_tokens, xla.padding_gap)
        self.request_buckets = padding_buckets(min(xla.min_request_bucket, xla.max_num_seqs), xla.max_num_seqs,
                                               xla.padding_gap)
        max_model_len = min(xla.max_model_len or mc.max_model_len, mc.max_model_len)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.sink_block = self.num_blocks  # past the engine's blocks (see kv_cache_shape)
        self.num_top = min(xla.max_logprobs, mc.vocab_size)
        self._keys = random.Random()
        self._sync()  # materialize the weights and the zeroed KV cache, so no step's graph includes them
        self.warm_up_counts: dict[str, int] | None = None
        self.warm_up_seconds = 0.0
        self._graphs_after_warm_up: int | None = None
        if xla.warm_up:
            self.warm_up()

    # --- start-up ---

    def bucket_pairs(self) -> list[tuple[int, int]]:
        """Every (tokens, requests) shape a step can take: a step of at most T tokens has at most T requests."""
        pairs = []
        for t in self.token_buckets:
            most = pick_bucket(min(t, self.request_buckets[-1]), self.request_buckets)
            pairs += [(t, r) for r in self.request_buckets if r <= most]
        return pairs

    def warm_up(self) -> dict[str, int]:
        """Compiles (or loads from the persistent cache) the device and host graph of every bucket pair."""
        start, before = time.perf_counter(), compile_counts()
        shapes = [(t, r, host) for t, r in self.bucket_pairs() for host in (False, True)]
        for t, r, host in _progress(shapes, "compiling XLA graphs"):
            self._run(self._dummy_batch(t, r), host)
        after = compile_counts()
        self.warm_up_counts = {name: after[name] - before[name] for name in after}
        self.warm_up_seconds = time.perf_counter() - start
        self._graphs_after_warm_up = after["graphs"]
        log.info("XLA warm-up: %d shapes in %.1f s (%s)", len(shapes), self.warm_up_seconds, self.warm_up_counts)
        return self.warm_up_counts

    @property
    def compilations_after_warm_up(self) -> int | None:
        """New graphs since warm_up() (None before it): anything but 0 means a shape escaped the buckets."""
        if self._graphs_after_warm_up is None:
            return None
        return compile_counts()["graphs"] - self._graphs_after_warm_up

    def _dummy_batch(self, t: int, r: int) -> _Batch:
        """A step of shape (t, r) with no real request: values do not matter to XLA, only shapes and dtypes do."""
        return self._to_device([0] * t, [0] * t, [self.sink_block * self.block_size] * t, [0] * (r + 1), [0] * r,
                               [[self.sink_block] * self.max_blocks_per_seq] * r, 0, [0] * r,
                               ([0.0] * r, [0] * r, [1.0] * r, [0.0] * r, [0] * r))

    # --- a step ---

    def execute(self, plan: StepPlan) -> StepResult:
        self._apply_plan(plan)
        if not plan.num_scheduled_tokens:
            return StepResult()

        scheduled = [(request_id, n, self.requests[request_id]) for request_id, n in plan.num_scheduled_tokens.items()]
        # A structured output's token mask is applied on the host, in the host graph compiled at warm-up.
        host_rows = {i for i, (request_id, n, state) in enumerate(scheduled)
                     if self._needs_host(state, n, request_id in plan.token_masks)}
        batch, token_offsets = self._prepare(scheduled)
        tokens, logprobs, top_ids, top_values, all_logits = self._run(batch, bool(host_rows))
        if self.strict and self.compilations_after_warm_up:
            raise RuntimeError(
                f"XLA compiled {self.compilations_after_warm_up} graph(s) after warm-up (step of "
                f"{len(token_offsets) - 1} requests, {token_offsets[-1]} tokens): a shape escaped the buckets"
            )

        result = StepResult()
        host_sampling, host_sample_rows, prompt_rows, prompt_targets = [], [], [], []
        for i, (request_id, n, state) in enumerate(scheduled):
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            state.num_computed_tokens = end
            if state.params.prompt_logprobs is not None:
                for position in range(start, min(end, state.num_prompt_tokens - 1)):
                    prompt_rows.append(token_offsets[i] + position - start)
                    prompt_targets.append((request_id, state.token_ids[position + 1]))
            if end < len(state.token_ids):
                continue  # mid-prefill: nothing to sample
            if i in host_rows and (self._needs_host_sampling(state) or request_id in plan.token_masks):
                host_sampling.append((request_id, state))
                host_sample_rows.append(token_offsets[i + 1] - 1)
                continue
            state.token_ids.append(tokens[i])
            result.sampled_token_ids[request_id] = tokens[i]
            num = state.params.logprobs
            if num is not None:
                top = list(zip(top_ids[i][:num], top_values[i][:num]))
                result.logprobs[request_id] = TokenLogprobs(tokens[i], logprobs[i], top)
        if host_sampling:
            self._sample(all_logits[host_sample_rows], host_sampling, result, plan.token_masks)
        if prompt_rows:
            self._prompt_logprobs(all_logits[prompt_rows], prompt_targets, result)
        return result

    def _needs_host(self, state: _RequestState, num_new: int, masked: bool = False) -> bool:
        prompt_logprobs = (state.params.prompt_logprobs is not None
                           and state.num_computed_tokens < state.num_prompt_tokens - 1)
        return prompt_logprobs or (state.num_computed_tokens + num_new >= len(state.token_ids)
                                   and (masked or self._needs_host_sampling(state)))

    def _needs_host_sampling(self, state: _RequestState) -> bool:
        p = state.params
        return bool(p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                    or len(state.token_ids) - state.num_prompt_tokens < p.min_tokens
                    or (p.logprobs or 0) > self.num_top)

    def _prepare(self, scheduled: list) -> tuple[_Batch, list[int]]:
        """The step as host lists, padded to its buckets, then copied to the device; also each request's token offset."""
        input_ids, positions, slots, offsets, seq_lens, tables, sampling = [], [], [], [0], [], [], ([], [], [], [], [])
        for request_id, n, state in scheduled:
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            input_ids += state.token_ids[start:end]
            positions += range(start, end)
            slots += [state.block_ids[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, end)]
            offsets.append(offsets[-1] + n)
            seq_lens.append(end)
            if len(state.block_ids) > self.max_blocks_per_seq:
                raise ValueError(f"request {request_id} holds {len(state.block_ids)} blocks; the XLA worker was "
                                 f"built for {self.max_blocks_per_seq} (max_model_len)")
            tables.append(state.block_ids + [self.sink_block] * (self.max_blocks_per_seq - len(state.block_ids)))
            for column, value in zip(sampling, self._sampling_row(state)):
                column.append(value)
        t, r = pick_bucket(offsets[-1], self.token_buckets), pick_bucket(len(scheduled), self.request_buckets)
        pad_t, pad_r = t - offsets[-1], r - len(scheduled)
        sink_slot = self.sink_block * self.block_size
        batch = self._to_device(
            input_ids + [0] * pad_t, positions + [0] * pad_t, slots + [sink_slot] * pad_t,
            offsets + [offsets[-1]] * pad_r, seq_lens + [0] * pad_r,
            tables + [[self.sink_block] * self.max_blocks_per_seq] * pad_r, len(scheduled),
            [end - 1 for end in offsets[1:]] + [0] * pad_r,
            tuple(column + [pad] * pad_r for column, pad in zip(sampling, (0.0, 0, 1.0, 0.0, 0))),
        )
        return batch, offsets

    def _sampling_row(self, state: _RequestState) -> tuple[float, int, float, float, int]:
        p = state.params
        step = len(state.token_ids) - state.num_prompt_tokens
        key = seed_key(p.seed, step) if p.seed is not None else self._keys.randrange(-2**31, 2**31)
        return p.temperature, p.top_k, p.top_p, p.min_p, key

    def _to_device(self, input_ids, positions, slots, query_start_loc, seq_lens, block_tables, num_seqs,
                   logits_indices, sampling) -> _Batch:
        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device)

        meta = XlaAttentionMetadata(
            query_start_loc=tensor(query_start_loc, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            slot_mapping=tensor(slots, torch.long),
            num_decodes=0,  # unused: the XLA backend treats every request alike
            query_lens_cpu=[],
            seq_lens_cpu=[],
            num_seqs=tensor([num_seqs], torch.int32),
        )
        dtypes = (torch.float32, torch.int32, torch.float32, torch.float32, torch.int32)
        return _Batch(tensor(input_ids, torch.long), tensor(positions, torch.long), meta,
                      tensor(logits_indices, torch.long),
                      tuple(tensor(column, dtype) for column, dtype in zip(sampling, dtypes)))

    def _run(self, batch: _Batch, host: bool) -> tuple:
        """One graph: model, logits at the sampled rows, sampling (and, for `host`, every token's logits)."""
        with torch.no_grad():
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
            vocab = self.model_config.vocab_size
            logits = self.model.compute_logits(hidden[batch.logits_indices])[:, :vocab]
            outputs = sample(logits, *batch.sampling, num_top=self.num_top)
            if host:
                outputs += (self.model.compute_logits(hidden)[:, :vocab],)
            del hidden, logits  # only the outputs and the KV cache may be live at the sync: they are the graph
            self._sync()
        tokens, logprobs, top_ids, top_values = (x.cpu().tolist() for x in outputs[:4])
        return tokens, logprobs, top_ids, top_values, outputs[4].cpu() if host else None

    def _sync(self) -> None:
        self._torch_xla.sync()


def _progress(items: list, description: str):
    """tqdm when it is installed, otherwise one line that rewrites itself."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc=description, unit="graph")
        return
    start = time.perf_counter()
    for i, item in enumerate(items):
        print(f"\r{description}: {i}/{len(items)} ({time.perf_counter() - start:.0f} s)", end="", flush=True)
        yield item
    print(f"\r{description}: {len(items)}/{len(items)} ({time.perf_counter() - start:.0f} s)", flush=True)
