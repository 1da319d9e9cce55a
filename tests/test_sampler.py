"""The sampler against direct computations: greedy, raw logprobs, seeds, filters, penalties, bias, min_tokens."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tessera.worker.sampler import Sampler, SamplingRow, top_logprobs
from tessera.sampling_params import SamplingParams

VOCAB = 64
EOS = 2


def make_row(output=(), prompt=(1, 3, 4), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output))


def make_sampler(seed: int = 0, vocab: int = VOCAB) -> Sampler:
    sampler = Sampler(vocab, [EOS])
    sampler.generator.manual_seed(seed)
    return sampler


def random_logits(n: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = random_logits(8)
    logits[3, 9] = logits[3, 40] = 100.0
    rows = [make_row(temperature=0.0, top_k=2, top_p=0.5) for _ in range(8)]  # filters cannot move an argmax
    out = make_sampler()(logits, rows)
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None  # no row asked: no log_softmax over the vocabulary
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids[3] == 9
    assert out.top_token_ids is None and out.top_logprobs is None


def test_plain_greedy_rows_unaffected_by_busy_neighbours():
    logits = random_logits(6)
    rows = [
        make_row(temperature=0.0),
        make_row(temperature=1.0, seed=1),
        make_row(temperature=0.0),
        make_row(temperature=0.0, repetition_penalty=2.0, output=[5]),
        make_row(temperature=0.7, top_k=3, top_p=0.8),
        make_row(temperature=0.0),
    ]
    out = make_sampler()(logits, rows)
    for i in (0, 2, 5):
        assert out.token_ids[i] == logits[i].argmax()


def test_logprobs_are_raw_even_when_processing_changes_the_choice():
    logits = random_logits(5)
    before = logits.clone()
    rows = [
        make_row(temperature=0.0, logit_bias={7: 50.0}, logprobs=0),
        make_row(temperature=0.3, logit_bias={11: 50.0}),
        make_row(temperature=0.0, repetition_penalty=1.8, presence_penalty=2.0, output=[int(logits[2].argmax())]),
        make_row(temperature=2.0, top_k=5, seed=3),
        make_row(temperature=0.0),
    ]
    out = make_sampler()(logits, rows)  # one row asks for logprobs: every row gets its chosen token's
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(logits, before), "the caller's logits must not be modified"
    assert out.token_ids[0] == 7 and out.token_ids[1] == 11
    assert out.token_ids[2] != logits[2].argmax()
    expected = torch.log_softmax(logits, dim=-1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)


def test_top_logprobs_sorted_and_consistent():
    logits = random_logits(4, seed=1)
    rows = [make_row(logprobs=None), make_row(logprobs=0), make_row(logprobs=3, temperature=0.0), make_row(logprobs=5)]
    out = make_sampler()(logits, rows)
    assert out.top_token_ids.shape == (4, 5) and out.top_token_ids.dtype == torch.int64
    assert out.top_logprobs.shape == (4, 5) and out.top_logprobs.dtype == torch.float32
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_token_ids))
    torch.testing.assert_close(out.top_logprobs, raw.topk(5, dim=-1).values)
    assert torch.equal(out.top_token_ids[:, 0], logits.argmax(dim=-1))
    assert torch.all(out.logprobs <= out.top_logprobs[:, 0])

    ids, values = top_logprobs(logits, 3)
    assert torch.equal(ids, out.top_token_ids[:, :3])
    torch.testing.assert_close(values, out.top_logprobs[:, :3])

    none_asked = make_sampler()(logits, [make_row(logprobs=0), make_row(), make_row(), make_row()])
    assert none_asked.top_token_ids is None and none_asked.top_logprobs is None


def test_empty_batch():
    out = make_sampler()(torch.empty(0, VOCAB), [])
    assert out.token_ids.shape == (0,) and out.logprobs is None and out.top_token_ids is None


# --- seeds ---

FLAT_VOCAB = 1000  # flat enough that two independent draws rarely agree


def seeded_tokens(sampler: Sampler, logits_row: torch.Tensor, params: dict, steps: int, batch_with=None, at=0):
    """Tokens of one seeded request over `steps` steps, optionally sampled inside a batch of other rows."""
    tokens = []
    for _ in range(steps):
        rows = list(batch_with or [])
        rows.insert(at, make_row(output=tokens, **params))
        logits = random_logits(len(rows), FLAT_VOCAB, seed=len(tokens) + 100, scale=0.1)
        logits[at] = logits_row
        tokens.append(int(sampler(logits, rows).token_ids[at]))
    return tokens


def test_seeded_rows_reproducible_and_independent_of_batch():
    logits_row = random_logits(1, FLAT_VOCAB, seed=7, scale=0.5)[0]
    params = dict(seed=1234, temperature=0.9, top_p=0.95, top_k=500)
    alone = seeded_tokens(make_sampler(0, FLAT_VOCAB), logits_row, params, steps=12)
    others = [make_row(), make_row(seed=99), make_row(temperature=0.0), make_row(top_p=0.5, seed=5)]
    crowded = seeded_tokens(make_sampler(1, FLAT_VOCAB), logits_row, params, steps=12, batch_with=others, at=2)
    reordered = seeded_tokens(make_sampler(2, FLAT_VOCAB), logits_row, params, steps=12, batch_with=others[::-1], at=4)
    assert alone == crowded == reordered
    assert len(set(alone)) > 6  # really random, not stuck on one token

    # A preempted request recomputes with its tokens so far: same step, same seed, same token.
    sampler = make_sampler(3, FLAT_VOCAB)
    resumed = [int(sampler(logits_row[None], [make_row(output=alone[:s], **params)]).token_ids[0]) for s in range(12)]
    assert resumed == alone


def test_same_seed_different_step_or_seed_gives_different_noise():
    logits = torch.zeros(20, FLAT_VOCAB)  # uniform: the token is the noise's argmax
    sampler = make_sampler(0, FLAT_VOCAB)
    by_step = sampler(logits, [make_row(output=[0] * step, seed=42) for step in range(20)]).token_ids
    by_seed = sampler(logits, [make_row(seed=seed) for seed in range(20)]).token_ids
    assert len(set(by_step.tolist())) >= 17
    assert len(set(by_seed.tolist())) >= 17


def test_unseeded_rows_follow_the_shared_generator():
    logits = torch.zeros(8, FLAT_VOCAB)
    rows = [make_row() for _ in range(8)]
    first = make_sampler(5, FLAT_VOCAB)(logits, rows).token_ids
    again = make_sampler(5, FLAT_VOCAB)(logits, rows).token_ids
    assert torch.equal(first, again)
    assert len(set(first.tolist())) >= 6


# --- filters: support and distribution ---


def filtered_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The distribution a sampler must follow, computed directly in float64."""
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones_like(p, dtype=bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1.0:
        mass_before = 0.0
        for token in order:
            if mass_before >= top_p:
                keep[token] = False
            mass_before += q[token]
    q = np.where(keep, p, 0.0)
    keep &= q >= min_p * q.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


FILTERS = [
    dict(temperature=1.0),
    dict(temperature=1.0, top_k=1000),  # larger than the vocabulary: no filter
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.15),
    dict(temperature=0.8, top_k=9, top_p=0.9, min_p=0.05),
    dict(temperature=1.5, top_k=6, top_p=0.6),
    dict(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_samples_follow_the_filtered_distribution(params):
    logits = np.array([3.0, 2.5, 2.2, 2.0, 1.6, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    expected = filtered_distribution(logits, **params)
    draws = 20000
    rows = [SamplingRow(SamplingParams(**params), [], [])] * draws
    logits_t = torch.tensor(logits, dtype=torch.float32).expand(draws, -1)
    tokens = make_sampler(seed=2024, vocab=len(logits))(logits_t, rows).token_ids.numpy()
    counts = np.bincount(tokens, minlength=len(logits))
    kept = expected > 0
    assert counts[~kept].sum() == 0, f"excluded tokens drawn: {counts}"
    if kept.sum() > 1:
        _, p_value = chisquare(counts[kept], expected[kept] * draws)
        assert p_value > 1e-3, f"counts {counts} vs expected {np.round(expected * draws)}"


@pytest.mark.parametrize(
    "params",
    [dict(top_k=20), dict(top_p=0.3), dict(min_p=0.3), dict(temperature=2.0, top_k=40, top_p=0.5, min_p=0.02)],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_filters_never_emit_excluded_tokens(params):
    vocab, draws = 2000, 600
    logits = random_logits(1, vocab, seed=11, scale=2.0)[0]
    allowed = filtered_distribution(logits.double().numpy(), **params) > 0
    rows = [make_row(**params) for _ in range(draws)]
    tokens = make_sampler(7, vocab)(logits.expand(draws, -1), rows).token_ids.numpy()
    assert allowed[tokens].all()
    assert len(set(tokens.tolist())) > 1


# --- penalties, bias, min_tokens ---


def penalized_logits(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """Repetition (HF) then presence/frequency (OpenAI) penalties, token by token in float64."""
    x = logits.double().clone()
    p = row.params
    for token in set(row.prompt_token_ids) | set(row.output_token_ids):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token, count in Counter(row.output_token_ids).items():
        x[token] -= p.presence_penalty + p.frequency_penalty * count
    return x


def test_penalties_match_direct_computation():
    vocab, n = 8, 400
    rng = np.random.default_rng(0)
    logits = random_logits(n, vocab, seed=3, scale=1.5)
    rows = []
    for i in range(n):
        penalize = i % 5 != 0  # a few plain rows in the mix
        rows.append(
            SamplingRow(
                SamplingParams(
                    temperature=0.0,
                    repetition_penalty=float(rng.uniform(0.5, 2.5)) if penalize else 1.0,
                    presence_penalty=float(rng.uniform(-2, 2)) if penalize and i % 3 else 0.0,
                    frequency_penalty=float(rng.uniform(-2, 2)) if penalize and i % 4 else 0.0,
                ),
                rng.integers(0, vocab, size=rng.integers(0, 5)).tolist(),
                rng.integers(0, vocab, size=rng.integers(0, 6)).tolist(),
            )
        )
    tokens = make_sampler(vocab=vocab)(logits, rows).token_ids
    moved = compared = 0
    for i, row in enumerate(rows):
        expected = penalized_logits(logits[i], row)
        best, second = expected.topk(2).values
        if best - second < 1e-4:
            continue  # too close to call in float32
        compared += 1
        assert tokens[i] == expected.argmax(), f"row {i}: {row}"
        moved += int(expected.argmax() != logits[i].argmax())
    assert compared > 350 and moved > 80  # the penalties really changed many choices


def test_frequency_penalty_counts_only_output_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 10] = 1.0
    logits[0, 11] = 0.9
    # Token 10 fills the prompt (ignored by frequency) and appears once in the output: 1.0 - 0.2 < 0.9.
    row = make_row(prompt=[10] * 20, output=[10], temperature=0.0, frequency_penalty=0.2)
    assert make_sampler()(logits, [row]).token_ids[0] == 11
    row = make_row(prompt=[10] * 20, output=[], temperature=0.0, frequency_penalty=0.2)
    assert make_sampler()(logits, [row]).token_ids[0] == 10


def test_logit_bias_forces_and_bans_tokens():
    logits = random_logits(4)
    top = logits.argmax(dim=-1)
    rows = [
        make_row(temperature=0.0, logit_bias={33: 100.0}),
        make_row(temperature=1.0, top_k=3, logit_bias={33: 100.0}, seed=1),  # bias comes before top_k
        make_row(temperature=0.0, logit_bias={int(top[2]): -100.0}),
        make_row(temperature=0.0, logit_bias={int(top[3]): -100.0, 17: 0.5}),
    ]
    out = make_sampler()(logits, rows)
    assert out.token_ids[0] == 33 and out.token_ids[1] == 33
    assert out.token_ids[2] != top[2] and out.token_ids[3] != top[3]


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    stop = 5
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, stop] = 9.0
    logits[0, 20] = 1.0
    sampler = make_sampler()

    def pick(output, **params):
        row = make_row(output=output, min_tokens=3, stop_token_ids=[stop], **params)
        return int(sampler(logits, [row]).token_ids[0])

    for length in range(3):
        assert pick([20] * length, temperature=0.0) == 20
        assert pick([20] * length, temperature=1.0, top_k=1, seed=length) == 20
    assert pick([20] * 3, temperature=0.0) == EOS
    # ignore_eos: EOS ends nothing, so it is not blocked; stop ids still are.
    assert pick([], temperature=0.0, ignore_eos=True) == EOS
    logits[0, EOS] = -math.inf
    assert pick([], temperature=0.0, ignore_eos=True) == 20


def test_ties_at_the_top_k_boundary_keep_the_lowest_ids():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, [40, 12, 30, 7]] = 1.0  # four-way tie, top_k=2 keeps ids 7 and 12
    draws = 400
    rows = [make_row(top_k=2, seed=s) for s in range(draws)]
    alone = make_sampler()(logits.expand(draws, -1), rows).token_ids
    assert set(alone.tolist()) == {7, 12}
    # Another row asking for a wider candidate set changes nothing for these.
    mixed = make_sampler()(logits.expand(draws + 1, -1), rows + [make_row(top_p=0.99)]).token_ids[:draws]
    assert torch.equal(alone, mixed)


def test_columns_past_the_vocabulary_are_ignored():
    logits = random_logits(3, VOCAB + 8)
    logits[:, VOCAB:] = 100.0  # padding of the lm_head
    out = make_sampler()(logits, [make_row(temperature=0.0), make_row(), make_row(logprobs=2)])
    assert torch.all(out.token_ids < VOCAB)
    expected = torch.log_softmax(logits[:, :VOCAB], dim=-1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)


def test_top_k_ranks_negative_zero_and_banned_logits_correctly():
    logits = torch.tensor([[-3.0, 0.5, -0.25, -math.inf, 2.0, -1.0, 0.0, -7.5]])
    draws = 2000
    rows = [make_row(temperature=3.0, top_k=4)] * draws
    tokens = make_sampler(vocab=8)(logits.expand(draws, -1), rows).token_ids
    assert set(tokens.tolist()) == {4, 1, 6, 2}


def test_top_p_candidates_shortcut_filters_exactly_like_the_full_sort():
    """Top-p without top-k first tries a partial sort of a few candidates; whether the nucleus fits there or
    not (then it falls back), the mask must be the full sort's."""
    from tessera.worker.sampler import _apply_top_k_top_p

    torch.manual_seed(0)
    peaked = torch.randn(6, 5000) * 6.0  # a trained model's shape: the nucleus is a few dozen tokens
    flat = torch.randn(3, 5000) * 0.1  # a random model's: the nucleus is most of the vocabulary
    for logits, top_k, top_p in (
        (peaked, [0, 0, -1, 20, 0, 0], [0.9, 0.5, 0.99, 0.8, 1.0 - 1e-6, 0.95]),
        (flat, [0, 0, 0], [0.9, 0.5, 0.3]),
        (torch.cat([peaked[:2], flat[:1]]), [0, 0, 0], [0.9, 0.9, 0.9]),  # one row does not fit: all fall back
    ):
        shortcut = _apply_top_k_top_p(logits.clone(), top_k, top_p, candidates=64)
        full = _apply_top_k_top_p(logits.clone(), top_k, top_p, candidates=10**9)
        assert torch.equal(shortcut.isinf(), full.isinf())
        assert torch.equal(shortcut[~shortcut.isinf()], full[~full.isinf()])
    kept = (~_apply_top_k_top_p(peaked.clone(), [0] * 6, [0.9] * 6, candidates=64).isinf()).sum(-1)
    assert (kept < 64).all() and (kept > 1).any()  # the shortcut really was taken and really filtered
