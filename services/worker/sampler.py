"""The sampler: turns one step's logits into next tokens and their logprobs (runs on the worker).

Per row, in this order: the structured-output token mask (disallowed tokens to -inf, before everything
else, so no later rule can bring one back), logit bias, min_tokens (EOS and stop ids banned until
reached, unless they are all the mask allows), repetition penalty, presence and frequency penalties,
then either argmax (temperature 0) or temperature, top-k, top-p, min-p and a draw. Each stage runs
once, batched over the rows that use it, so a plain greedy row costs only its share of one argmax and
one log_softmax.

Reported logprobs always come from the model's raw distribution (log_softmax of the logits before any
processing): that is what clients and the parity tests with transformers compare with.

Draws use the exponential race: argmax_i(p_i / E_i) with E_i ~ Exponential(1) picks i with probability
p_i, as one vectorized op. A seeded row draws its noise from its own generator, seeded by (seed, step),
so its tokens depend on nothing else in the batch and come out the same after preemption and recompute.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tessera.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs about one request this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far (before this step)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [n]
    logprobs: torch.Tensor | None  # float32 [n]: the chosen token's raw logprob; None if no row asked for logprobs
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

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 token_masks: torch.Tensor | None = None) -> SamplerOutput:
        """`token_masks`: int32 [n, ceil(vocab / 32)] bitsets of the allowed tokens (structured output), or None."""
        logits = logits[:, : self.vocab_size].float()  # columns past the vocabulary pad the lm_head
        # A pass over the whole vocabulary per row: only when some row reports logprobs.
        wanted = any(row.params.logprobs is not None for row in rows)
        raw_logprobs = logits.log_softmax(dim=-1) if wanted else None
        if token_masks is not None:
            logits = apply_token_masks(logits, token_masks)
        token_ids = argmax(logits)  # final for plain greedy rows

        busy = [i for i, row in enumerate(rows) if not self._is_plain_greedy(row)]
        if busy:
            # _select copies, so the processing below never touches the caller's logits.
            token_ids[busy] = self._sample(_select(logits, busy), [rows[i] for i in busy])

        num_top = max((row.params.logprobs or 0 for row in rows), default=0)
        top_ids = top_values = None
        if num_top > 0:
            top_values, top_ids = raw_logprobs.topk(num_top, dim=-1)
        return SamplerOutput(
            token_ids=token_ids,
            logprobs=raw_logprobs.gather(1, token_ids[:, None]).squeeze(1) if wanted else None,
            top_token_ids=top_ids,
            top_logprobs=top_values,
        )

    def _is_plain_greedy(self, row: SamplingRow) -> bool:
        # (a token mask is applied to every row up front, so a masked greedy row is still plain)
        return plain_greedy(row.params, len(row.output_token_ids))

    def greedy(self, logits: torch.Tensor) -> list[int]:
        """What __call__ picks for rows that are all plain_greedy, with no masks and no logprobs: the argmax (of
        float32 or bf16 logits alike: widening them would not change it)."""
        return argmax(logits[:, : self.vocab_size]).tolist()

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Processes `logits` (a private copy, modified in place) and picks one token per row."""
        self._add_logit_bias(logits, rows)
        self._ban_until_min_tokens(logits, rows)
        self._apply_repetition_penalty(logits, rows)
        self._apply_presence_frequency_penalties(logits, rows)

        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        random = [i for i, row in enumerate(rows) if not row.params.greedy]
        if not greedy:
            return self._draw(logits, rows)  # the usual case, without a second copy
        token_ids = argmax(logits)  # final for greedy rows
        if random:
            token_ids[random] = self._draw(_select(logits, random), [rows[i] for i in random])
        return token_ids

    # --- logit processing: each stage touches only the (row, token) pairs it changes ---

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
            index = (_long(row_idx, logits.device), _long(token_idx, logits.device))
            before = logits[index]
            logits[index] = -math.inf
            # A complete structured output allows only the end: then the grammar wins over min_tokens.
            dead = torch.isneginf(logits).all(dim=-1)
            if bool(dead.any()):
                keep = dead[index[0]]
                logits[index[0][keep], index[1][keep]] = before[keep]

    def _apply_repetition_penalty(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        chosen = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
        if not chosen:
            return
        # Hugging Face semantics: every token seen in prompt or output, once, whatever its count. A token seen
        # twice is gathered twice and written twice with the same value, so it is still penalized once.
        row_idx, token_idx = _token_positions(
            [i for i in chosen for _ in range(2)],
            [seq for i in chosen for seq in (rows[i].prompt_token_ids, rows[i].output_token_ids)],
            logits.device,
        )
        penalty = torch.tensor([row.params.repetition_penalty for row in rows], device=logits.device)[row_idx]
        seen = logits[row_idx, token_idx]
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        logits[row_idx, token_idx] = torch.where(seen > 0, seen / penalty, seen * penalty)

    def _apply_presence_frequency_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        chosen = [i for i, row in enumerate(rows) if row.params.presence_penalty or row.params.frequency_penalty]
        if not chosen:
            return
        # OpenAI semantics: generated tokens only; logit -= presence * (count > 0) + frequency * count.
        row_idx, token_idx = _token_positions(chosen, [rows[i].output_token_ids for i in chosen], logits.device)
        vocab = logits.shape[-1]
        pairs, counts = torch.unique(row_idx * vocab + token_idx, return_counts=True)
        row_idx, token_idx = pairs // vocab, pairs % vocab
        presence = torch.tensor([row.params.presence_penalty for row in rows], device=logits.device)[row_idx]
        frequency = torch.tensor([row.params.frequency_penalty for row in rows], device=logits.device)[row_idx]
        logits[row_idx, token_idx] -= presence + frequency * counts

    # --- random rows ---

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([row.params.temperature for row in rows], device=device)
        # The floor keeps logits finite (a tiny temperature is all but greedy anyway).
        logits.div_(temperature.clamp_min(1e-6)[:, None])

        filtered = [i for i, row in enumerate(rows) if row.params.top_k > 0 or row.params.top_p < 1.0]
        if filtered:
            top_k = [rows[i].params.top_k for i in filtered]
            top_p = [rows[i].params.top_p for i in filtered]
            logits[filtered] = _apply_top_k_top_p(_select(logits, filtered), top_k, top_p)

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


NUCLEUS_CANDIDATES = 1024  # a trained model's top-p nucleus nearly always lies within this many tokens


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float],
                       candidates: int = NUCLEUS_CANDIDATES) -> torch.Tensor:
    """Masks to -inf what top-k (k <= 0: off) and then top-p (1: off) exclude, with one partial sort."""
    vocab = logits.shape[-1]
    kept = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=logits.device)
    p = torch.tensor(top_p, device=logits.device)[:, None]
    # Only the best max(k) tokens can survive, and on CPU a partial sort (topk) is many times cheaper than
    # a full one. Unique ranking keys keep tied logits from ranking differently as that max (the batch) changes.
    keys = _ranking_keys(logits)
    width = int(kept.max())
    whole_vocab = log_total = None
    if width > candidates:
        # A row without top-k would need the full sort, unless its nucleus fits in the first `candidates`
        # tokens, which we can check exactly: their share of the whole distribution reaches top_p.
        order = keys.topk(candidates, dim=-1).indices
        sorted_logits = logits.gather(-1, order)
        log_total = logits.logsumexp(dim=-1, keepdim=True)
        mass = (sorted_logits - log_total).exp().sum(dim=-1)
        whole_vocab = kept == vocab
        fits = (kept <= candidates) | (whole_vocab & (p[:, 0] < 1.0) & (mass >= p[:, 0]))
        if bool(fits.all()):
            width = candidates
        else:
            whole_vocab = None
    if width != candidates or whole_vocab is None:
        order = keys.topk(width, dim=-1).indices
        sorted_logits = logits.gather(-1, order)
    rank = torch.arange(order.shape[-1], device=logits.device)
    sorted_logits.masked_fill_(rank >= kept[:, None], -math.inf)
    # Top-p over what top-k left: drop a token once the more likely ones already reach top_p, which always
    # keeps the first. Rows with top_p == 1 skip it, so rounding in the cumsum cannot trim their tail.
    probs = sorted_logits.softmax(dim=-1)
    if whole_vocab is not None and bool(whole_vocab.any()):
        # Only the candidates are here, but these rows' probabilities are shares of the whole vocabulary.
        probs[whole_vocab] = (sorted_logits[whole_vocab] - log_total[whole_vocab]).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits.masked_fill_((mass_before >= p) & (p < 1.0), -math.inf)
    return torch.full_like(logits, -math.inf).scatter_(-1, order, sorted_logits)


# Row v: what to add to the 8 logits of a mask byte of value v: 0 where its bit is set, -inf where not.
_BYTE_PENALTIES = torch.tensor([[0.0 if v >> bit & 1 else -math.inf for bit in range(8)] for v in range(256)])


def plain_greedy(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether a row's token is just the argmax of its logits: greedy, with nothing that changes the logits."""
    return (
        params.greedy
        and not params.logit_bias
        and num_output_tokens >= params.min_tokens
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
    )


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) (first index on ties); on the CPU the native kernel's (kernels/decode_ops_cpu.cpp),
    16 values a step where PyTorch's goes one by one (~2 ms for 64 rows of a 32000-token vocabulary)."""
    if (logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[1] > 0
            and logits.dtype in (torch.float32, torch.bfloat16) and _native_argmax()):
        return torch.ops.tessera.argmax_rows(logits)
    return logits.argmax(dim=-1)


@functools.cache
def _native_argmax() -> bool:
    from tessera.kernels import paged_attention_cpu

    return paged_attention_cpu.load("decode_ops") is not None


def apply_token_masks(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of float32 `logits` [n, vocab] with the tokens the bitmasks [n, words] do not allow at -inf.

    Each mask byte looks up its eight penalties in a 256-row table, and one add applies them: on CPU ~6x faster
    than unpacking the bits and masked_fill (which runs a scalar loop), e.g. 0.5 vs 3.1 ms for 32 rows of 32000.
    """
    table = _BYTE_PENALTIES.to(logits.device)
    # Native byte order is little-endian on every host we run on: byte k of word i holds tokens 32i + 8k ...
    penalties = torch.nn.functional.embedding(bitmask.contiguous().view(torch.uint8).int(), table)
    return logits + penalties.view(bitmask.shape[0], -1)[:, : logits.shape[-1]]


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [n, vocab_size] from int32 [n, words] bitsets: bit j of word i is token 32 * i + j (the reference)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: the sign bit still lands in bit 0
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _ranking_keys(logits: torch.Tensor) -> torch.Tensor:
    """int64 [n, vocab], ordered like (logit, then the lower token id first) and unique within a row."""
    bits = logits.contiguous().view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # flip the magnitude bits of negatives: float order = int order
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return bits.long().mul_(2**32).add_(logits.shape[-1] - 1 - ids)


def _token_positions(
    row_ids: list[int], sequences: list[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every token of every sequence; sequences[j] belongs to row row_ids[j]."""
    tokens = [torch.as_tensor(seq, dtype=torch.long).reshape(-1).cpu() for seq in sequences]
    row_idx = torch.repeat_interleave(torch.tensor(row_ids), torch.tensor([len(t) for t in tokens]))
    return row_idx.to(device), torch.cat(tokens).to(device)


def _select(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """A copy of the given rows (index_select is several times faster than x[list] on CPU)."""
    return x.index_select(0, _long(rows, x.device))


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
