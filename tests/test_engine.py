"""The engine end to end, in-process: parity with transformers, batch invariance, prefix reuse, aborts, stops."""
from __future__ import annotations

import queue
import random
import threading
import time

import pytest
import torch

from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.engine_loop import EngineLoop
from tessera.worker.models.packed_linear import onednn_available
from tessera.engine.request import FinishReason
from tessera.sampling_params import InvalidParam, SamplingParams
from hf_reference import assert_greedy_matches_transformers, hf_model
from tiny_checkpoints import PRESETS, preset_checkpoint

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def make_engine(model_dir, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), block_size=4, kv_cache_memory=1 << 22, **overrides))


def random_prompts(count, low, high, seed=0, vocab=256):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_greedy_tokens_and_logprobs_match_transformers(tmp_path_factory, preset):
    model_dir = preset_checkpoint(tmp_path_factory, preset)
    prompts = random_prompts(3, 5, 24, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    completions = make_engine(model_dir).generate(prompts, params)
    assert all(c.finish_reason is FinishReason.LENGTH for c in completions)
    # fp32 on both sides, different kernels: logprobs agree within 1e-4.
    assert_greedy_matches_transformers(model_dir, prompts, completions, NEW_TOKENS, atol=1e-4)


@pytest.mark.parametrize("cpu_matmul", ["aten", "onednn"])
def test_cpu_matmul_choice_reaches_the_worker_and_both_match_transformers(tmp_path_factory, cpu_matmul):
    if cpu_matmul == "onednn" and not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    model_dir = preset_checkpoint(tmp_path_factory, "llama_bias")
    engine = make_engine(model_dir, cpu_matmul=cpu_matmul)
    assert engine.worker.cpu_matmul == cpu_matmul
    assert make_engine(model_dir).worker.cpu_matmul == ("onednn" if onednn_available() else "aten")  # auto
    prompts = random_prompts(4, 5, 40, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    assert_greedy_matches_transformers(model_dir, prompts, engine.generate(prompts, params), NEW_TOKENS, atol=1e-4)


@pytest.mark.parametrize("preset", ["llama", "qwen3"])
def test_batch_invariance_with_chunked_prefill_and_preemption(tmp_path_factory, preset):
    model_dir = preset_checkpoint(tmp_path_factory, preset)
    rng = random.Random(3)
    prompts = random_prompts(32, 1, 60, seed=2)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 24), ignore_eos=True) for _ in prompts]

    alone_engine = make_engine(model_dir, enable_prefix_caching=False)
    alone = [alone_engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]

    # A 16-token budget chunks every long prompt; 48 blocks of 4 tokens cannot hold 32 requests, so the
    # scheduler must preempt and recompute.
    engine = make_engine(model_dir, num_kv_blocks=48, max_num_batched_tokens=16)
    batched = engine.generate(prompts, params)
    assert [c.token_ids for c in batched] == alone
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_blocks_in_use == 0


def test_seeded_sampling_is_independent_of_the_batch(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    prompts = random_prompts(12, 3, 40, seed=4)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=16, ignore_eos=True)
              for i in range(len(prompts))]
    alone = [make_engine(model_dir).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    engine = make_engine(model_dir, num_kv_blocks=24, max_num_batched_tokens=12)
    assert [c.token_ids for c in engine.generate(prompts, params)] == alone
    assert engine.scheduler.num_preemptions > 0


def test_prefix_cache_hit_reuses_blocks_and_gives_the_same_tokens(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    engine = make_engine(model_dir)
    prompt = random_prompts(1, 30, 30, seed=5)[0]
    first = engine.generate([prompt], GREEDY)[0]
    second = engine.generate([prompt], GREEDY)[0]
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == (len(prompt) - 1) // 4 * 4  # full blocks, never the whole prompt
    assert second.token_ids == first.token_ids
    # A different suffix shares the full blocks of the common prefix only.
    third = engine.generate([prompt[:17] + [7, 8, 9]], GREEDY)[0]
    assert third.usage.cached_tokens == 16
    assert engine.kv.stats.hit_rate == pytest.approx((28 + 16) / (30 + 30 + 20))


def test_abort_at_any_moment_frees_every_block(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    engine = make_engine(model_dir, max_num_batched_tokens=8)
    ids = [engine.add_request(p, GREEDY) for p in random_prompts(6, 10, 40, seed=6)]
    for _ in range(5):  # some requests mid-prefill, some decoding, some still waiting
        engine.step()
    assert engine.kv.num_blocks_in_use > 0
    finals = [engine.abort_request(request_id) for request_id in ids]
    assert all(f.finish_reason is FinishReason.ABORT for f in finals)
    assert engine.abort_request(ids[0]) is None
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_blocks_in_use == 0
    engine.step()  # the worker is told to forget them; nothing is left to run
    assert engine.worker.requests == {}


def test_stop_tokens_eos_min_tokens_and_max_tokens(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    engine = make_engine(model_dir)
    prompt = random_prompts(1, 12, 12, seed=7)[0]
    free_run = engine.generate([prompt], GREEDY)[0].token_ids
    stop_at = next(i for i, t in enumerate(free_run) if t not in free_run[:i] and i >= 3)

    stopped = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                       stop_token_ids=[free_run[stop_at]]))[0]
    assert stopped.token_ids == free_run[: stop_at + 1]  # the stop token is the last one streamed
    assert stopped.finish_reason is FinishReason.STOP

    short = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert short.token_ids == free_run[:5] and short.finish_reason is FinishReason.LENGTH
    assert short.usage.completion_tokens == 5 and short.usage.prompt_tokens == 12

    # The checkpoint's EOS ids are 2 and 3 (generation_config.json); bias EOS to win at once.
    eos = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={2: 100.0})
    assert engine.generate([prompt], eos)[0].token_ids == [2]
    held = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, logit_bias={2: 100.0},
                                                    min_tokens=3))[0]
    assert 2 not in held.token_ids[:3] and held.token_ids[3] == 2 and held.finish_reason is FinishReason.STOP
    ignored = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, logit_bias={2: 100.0},
                                                       ignore_eos=True))[0]
    assert ignored.token_ids == [2, 2, 2, 2] and ignored.finish_reason is FinishReason.LENGTH


def test_prompt_logprobs_match_transformers_across_chunks(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "qwen2")
    engine = make_engine(model_dir, max_num_batched_tokens=7)  # the prompt spans several chunks
    prompt = random_prompts(1, 25, 25, seed=8)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    engine.generate([prompt], params)  # a cached copy must not hide the prompt positions
    completion = engine.generate([prompt], params)[0]
    assert completion.usage.cached_tokens == 0
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([prompt])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert len(completion.prompt_logprobs) == len(prompt) - 1
    for position, entry in enumerate(completion.prompt_logprobs):
        assert entry.token_id == prompt[position + 1]
        assert entry.logprob == pytest.approx(reference[position, prompt[position + 1]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == reference[position].topk(3).indices.tolist()


def test_bad_input_names_the_field(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    engine = make_engine(model_dir)
    cases = [
        ([], SamplingParams(), "prompt_token_ids"),
        ([5, 256], SamplingParams(), "prompt_token_ids"),
        ([5] * 256, SamplingParams(max_tokens=1), "prompt_token_ids"),
        ([5], SamplingParams(temperature=-1), "sampling.temperature"),
        ([5], SamplingParams(top_p=0.0), "sampling.top_p"),
        ([5], SamplingParams(top_k=-2), "sampling.top_k"),
        ([5], SamplingParams(max_tokens=0), "stopping.max_tokens"),
        ([5] * 200, SamplingParams(max_tokens=100), "stopping.max_tokens"),
        ([5], SamplingParams(logprobs=21), "output.logprobs"),
    ]
    for prompt, params, field in cases:
        with pytest.raises(InvalidParam) as error:
            engine.add_request(prompt, params)
        assert error.value.field == field
    assert error.type is InvalidParam and not engine.has_unfinished_requests()


def test_engine_loop_streams_and_closing_the_stream_aborts(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    engine = make_engine(model_dir)
    loop = EngineLoop(engine)
    try:
        prompt = random_prompts(1, 10, 10, seed=9)[0]
        outputs = list(loop.stream(prompt, GREEDY))
        assert [t for o in outputs for t in o.new_token_ids] == engine_generate_reference(model_dir, prompt)
        assert outputs[-1].finished and outputs[-1].usage.completion_tokens == NEW_TOKENS

        stream = loop.stream(prompt, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        next(stream)
        stream.close()
        for _ in range(200):
            if loop.num_unfinished() == 0 and engine.kv.num_blocks_in_use == 0:
                break
            time.sleep(0.01)
        assert loop.num_unfinished() == 0 and engine.kv.num_blocks_in_use == 0
    finally:
        loop.shutdown()


def test_engine_loop_hands_off_after_small_steps_only(tmp_path_factory):
    """handoff runs on the engine thread after each step of 1..HANDOFF_MAX_OUTPUTS outputs (a CPU server streams
    them out there), never after a bigger step, and the tokens are those of a loop without it."""
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    engine = make_engine(model_dir)
    step, sizes = engine.step, []  # outputs of each step, in order
    engine.step = lambda: (outputs := step(), sizes.append(len(outputs)))[0]
    loop = EngineLoop(engine)
    handed_off = []  # (thread, outputs of the step just before)
    loop.handoff = lambda: handed_off.append((threading.current_thread().name, sizes[-1]))
    try:
        prompt = random_prompts(1, 10, 10, seed=9)[0]
        outputs = list(loop.stream(prompt, GREEDY))
        assert [t for o in outputs for t in o.new_token_ids] == engine_generate_reference(model_dir, prompt)
        assert handed_off == [("tessera-engine", 1)] * NEW_TOKENS

        handed_off.clear(), sizes.clear()
        many = EngineLoop.HANDOFF_MAX_OUTPUTS + 2
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        sinks = [queue.SimpleQueue() for _ in range(many)]
        for i, sink in enumerate(sinks):
            loop.submit(random_prompts(1, 6, 6, seed=i)[0], params, sink.put)
        for sink in sinks:
            while not sink.get(timeout=60).finished:
                pass
        assert max(sizes) > EngineLoop.HANDOFF_MAX_OUTPUTS  # some steps ran the whole batch
        assert [n for _, n in handed_off] == [n for n in sizes if 0 < n <= EngineLoop.HANDOFF_MAX_OUTPUTS]
    finally:
        loop.shutdown()


def engine_generate_reference(model_dir, prompt):
    return make_engine(model_dir).generate([prompt], GREEDY)[0].token_ids


def test_priority_orders_admission_and_preemption(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    # One request at a time: admission order is the order they finish in.
    engine = make_engine(model_dir, max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.add_request([5, 6, 7], params, request_id="first")
    engine.add_request([5, 6, 8], params, request_id="urgent", priority=-1)
    engine.add_request([5, 6, 9], params, request_id="later")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["urgent", "first", "later"]

    # Out of blocks, the lowest-priority running request is the one preempted.
    engine = make_engine(model_dir, num_kv_blocks=12, max_num_batched_tokens=64)
    long = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request(list(range(10, 30)), long, request_id="low", priority=5)
    engine.add_request(list(range(40, 60)), long, request_id="high", priority=0)
    while engine.has_unfinished_requests() and engine.scheduler.num_preemptions == 0:
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.requests["low"].num_preemptions > 0
    assert engine.scheduler.requests["high"].num_preemptions == 0
