"""The sampler: turns one step's logits into next tokens and their logprobs (runs on the worker).

Per row, in this order: logit bias, min_tokens (EOS and stop ids banned until reached), repetition
penalty, presence and frequency penalties, then either argmax (temperature 0) or temperature, top-k,
top-p, min-p and a draw. Each stage runs once over the rows that use it, so a plain greedy row costs
only its share of one argmax.

Reported logprobs always come from the model's raw distribution (log_softmax of the logits before any
processing): that is what clients and the parity tests with transformers compare with.

Draws use the exponential race: argmax_i(p_i / E_i) with E_i ~ Exponential(1) picks i with probability
p_i, as one vectorized op. A seeded row draws its noise from its own generator, seeded by (seed, step),
so its tokens depend on nothing else in the batch and come out the same after preemption and recompute.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tessera.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs about one request this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far (before this step)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [n]
    logprobs: torch.Tensor  # float32 [n]: the chosen token's logprob under the raw distribution
    top_token_ids: torch.Tensor | None  # int64 [n, k], k = max params.logprobs; None if no row asked
    top_logprobs: torch.Tensor | None  # float32 [n, k], descending, raw distribution


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row and their logprobs: (ids [n, k], logprobs [n, k]), descending."""
    values, ids = logits.float().log_softmax(dim=-1).topk(k, dim=-1)
    return ids, values


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        # Rows without a seed share this one; tests may manual_seed it. Replaced on the logits' device.
        self.generator = torch.Generator()
        self.generator.seed()

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1)
        token_ids = logits.argmax(dim=-1)  # final for plain greedy rows

        busy = [i for i, row in enumerate(rows) if not self._is_plain_greedy(row)]
        if busy:
            # logits[busy] is a copy: the caller's logits stay untouched.
            token_ids[busy] = self._sample(logits[busy], [rows[i] for i in busy])

        num_top = max((row.params.logprobs or 0 for row in rows), default=0)
        top_ids = top_values = None
        if num_top > 0:
            top_values, top_ids = raw_logprobs.topk(num_top, dim=-1)
        return SamplerOutput(
            token_ids=token_ids,
            logprobs=raw_logprobs.gather(1, token_ids[:, None]).squeeze(1),
            top_token_ids=top_ids,
            top_logprobs=top_values,
        )

    def _is_plain_greedy(self, row: SamplingRow) -> bool:
        p = row.params
        return (
            p.greedy
            and not p.logit_bias
            and len(row.output_token_ids) >= p.min_tokens
            and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
        )

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Processes `logits` (a private copy, modified in place) and picks one token per row."""
        self._add_logit_bias(logits, rows)
        self._ban_until_min_tokens(logits, rows)
        self._apply_repetition_penalty(logits, rows)
        self._apply_presence_frequency_penalties(logits, rows)

        token_ids = logits.argmax(dim=-1)  # final for greedy rows; random rows are overwritten below
        random = [i for i, row in enumerate(rows) if not row.params.greedy]
        if random:
            token_ids[random] = self._draw(logits[random], [rows[i] for i in random])
        return token_ids

    # --- logit processing, each stage only over the rows that use it ---

    def _add_logit_bias(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        row_idx, token_idx, bias = [], [], []
        for i, row in enumerate(rows):
            for token_id, value in row.params.logit_bias.items():
                row_idx.append(i)
                token_idx.append(token_id)
                bias.append(value)
        if row_idx:
            index = (_long(row_idx, logits.device), _long(token_idx, logits.device))
            logits.index_put_(index, torch.tensor(bias, device=logits.device), accumulate=True)

    def _ban_until_min_tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        row_idx, token_idx = [], []
        for i, row in enumerate(rows):
            p = row.params
            if len(row.output_token_ids) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                row_idx += [i] * len(banned)
                token_idx += banned
        if row_idx:
            logits[_long(row_idx, logits.device), _long(token_idx, logits.device)] = -math.inf

    def _apply_repetition_penalty(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        chosen = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
        if not chosen:
            return
        # Hugging Face semantics: every token seen in prompt or output, once, whatever its count.
        seen = _token_counts(
            [[rows[i].prompt_token_ids, rows[i].output_token_ids] for i in chosen], self.vocab_size, logits.device
        ) > 0
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in chosen], device=logits.device)[:, None]
        x = logits[chosen]
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        logits[chosen] = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)

    def _apply_presence_frequency_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        chosen = [
            i for i, row in enumerate(rows) if row.params.presence_penalty != 0.0 or row.params.frequency_penalty != 0.0
        ]
        if not chosen:
            return
        # OpenAI semantics: generated tokens only.
        counts = _token_counts([[rows[i].output_token_ids] for i in chosen], self.vocab_size, logits.device)
        presence = torch.tensor([rows[i].params.presence_penalty for i in chosen], device=logits.device)[:, None]
        frequency = torch.tensor([rows[i].params.frequency_penalty for i in chosen], device=logits.device)[:, None]
        logits[chosen] -= presence * (counts > 0) + frequency * counts

    # --- random rows ---

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([row.params.temperature for row in rows], device=device)
        # The floor keeps logits finite (a tiny temperature is all but greedy anyway).
        logits = logits.div_(temperature.clamp_min(1e-6)[:, None])

        filtered = [i for i, row in enumerate(rows) if row.params.top_k > 0 or row.params.top_p < 1.0]
        if filtered:
            top_k = _long([rows[i].params.top_k for i in filtered], device)
            top_p = torch.tensor([rows[i].params.top_p for i in filtered], device=device)
            logits[filtered] = _apply_top_k_top_p(logits[filtered], top_k, top_p)

        if any(row.params.min_p > 0.0 for row in rows):
            # p >= min_p * p_max  <=>  logit >= max logit + log(min_p); log(0) = -inf keeps everything.
            min_p = torch.tensor([row.params.min_p for row in rows], device=device)
            floor = logits.amax(dim=-1) + min_p.log()
            logits.masked_fill_(logits < floor[:, None], -math.inf)

        probs = logits.softmax(dim=-1)
        # Exponential(1) noise as -log(U), several times faster than exponential_() on CPU. U < 1 keeps the
        # noise above 0; the clamp keeps it finite, so the only token left by top_k=1 cannot lose to a 0.
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            noise[i].uniform_(generator=self._generator_for(row, device))
        return probs.div_(noise.clamp_min_(1e-30).log_().neg_()).argmax(dim=-1)

    def _generator_for(self, row: SamplingRow, device: torch.device) -> torch.Generator:
        seed = row.params.seed
        if seed is None:
            if self.generator.device != device:
                self.generator = torch.Generator(device)
                self.generator.seed()
            return self.generator
        # One stream per (seed, step): the same noise whatever the batch, the row order or a recompute.
        step = len(row.output_token_ids)
        digest = hashlib.blake2b(f"{seed}/{step}".encode(), digest_size=8).digest()
        return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") % 2**63)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Masks to -inf what top-k (k <= 0: off) and then top-p (1: off) exclude; one sort for both."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    sorted_logits.masked_fill_(rank >= k[:, None], -math.inf)
    # Top-p over what top-k left: drop a token once the more likely ones already reach top_p, which always
    # keeps the first. Rows with top_p == 1 skip it, so rounding in the cumsum cannot trim their tail.
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits.masked_fill_(drop, -math.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _token_counts(token_lists: list[list[Sequence[int]]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """float32 [len(token_lists), vocab_size]: how often each token occurs in each row's sequences."""
    per_row = [torch.cat([torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]) for seqs in token_lists]
    row_idx = torch.repeat_interleave(torch.arange(len(per_row)), torch.tensor([len(t) for t in per_row]))
    flat = (row_idx * vocab_size + torch.cat(per_row)).to(device)
    return torch.bincount(flat, minlength=len(per_row) * vocab_size).view(len(per_row), vocab_size).float()


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
