"""tessera.tokenizer.v1 (Tokenizer, TextGeneration) with real engine and tokenizer processes on loopback, checked
against Hugging Face transformers; the Tokenizer RPCs also as direct calls on the servicer.

The model is a tiny random Llama whose vocabulary is the repository's demo tokenizer (byte-level BPE, 8192 ids),
so random generations are full of lone UTF-8 bytes: the hard case for incremental detokenizing.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers import ServerProcess
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.tokenizer.chat_sandbox import ChatSandbox, SandboxLimits
from tessera.tokenizer.service import TokenizerService
from tessera.tokenizer.tokenizer import Tokenizer
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tiny_checkpoints import make_tiny_checkpoint
from tiny_tokenizers import LLAMA3, MISTRAL, TEXTS

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"
MAX_MODEL_LEN = 2048
LONG = 2000  # tokens: seconds of generation on a CPU, so a request is surely still running when we look
PROMPT = "The quick brown fox, naïve café 日本語 😀: def fibonacci(n):"
CHAT = [tokenizer_pb2.ChatMessage(role="system", content="You are terse. «Ünïcödé» 日本語"),
        tokenizer_pb2.ChatMessage(role="user", content="Write fibonacci(n) in Python 😀")]
CONVERSATION = [{"role": "system", "content": "Be terse. «Ünïcödé» 日本語"}, {"role": "user", "content": "Hi 😀"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Say \"</s>\" & bye\n"}]
TEXT_GENERATION = "tessera.tokenizer.v1.TextGeneration"
TOKENIZER = "tessera.tokenizer.v1.Tokenizer"


# -- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama that shares the demo tokenizer; EOS is <|endoftext|> and <|im_end|>, as in a chat model."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("demo_tiny"), "llama", vocab_size=Tokenizer(DEMO).vocab_size,
                                bos_token_id=None, eos_token_id=0, max_position_embeddings=MAX_MODEL_LEN,
                                generation=dict(eos_token_id=[0, 2]))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO / name, path / name)
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def hf_tok(hf):
    return hf[0]


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


def engine_process(model_dir) -> ServerProcess:
    # One compute thread: some tests watch each step's message (held-back stop strings), and on two cores an
    # OpenMP thread spinning between the tiny model's ~1 ms steps can starve the engine's event loop until
    # several steps queue up and go out merged (by design, for a reader that fell behind).
    return ServerProcess("engine", "--model", str(model_dir), "--block-size", "4", "--kv-cache-memory", "16MiB",
                         env={"OMP_NUM_THREADS": "1"})


def tokenizer_process(model_dir, *engines: ServerProcess) -> ServerProcess:
    """A tokenizer server forwarding to `engines` (on equal load it tries them in this order); it renders the
    chat templates the tests send (test_chat_sandbox.py tests the sandbox and the refusal)."""
    return ServerProcess("tokenizer", "--model", str(model_dir), *(f"--engine={e.address}" for e in engines),
                         "--allow-client-chat-template")


@pytest.fixture(scope="module")
def engine(model_dir):
    with engine_process(model_dir) as server:
        yield server


@pytest.fixture(scope="module")
def front(model_dir, engine):
    """The tokenizer server in front of `engine`."""
    with tokenizer_process(model_dir, engine) as server:
        yield server


@pytest.fixture(scope="module")
def second_engine_process(model_dir):
    server = engine_process(model_dir)
    yield server
    if server.process is not None:
        server.stop()


@pytest.fixture
def second_engine(second_engine_process):
    """Another engine on the same model, (re)started if an earlier test killed it."""
    if second_engine_process.process is None or second_engine_process.process.poll() is not None:
        second_engine_process.start()
    return second_engine_process


@pytest.fixture(scope="module")
def channels(front, engine):
    with grpc.insecure_channel(front.address) as tok, grpc.insecure_channel(engine.address) as eng:
        yield tok, eng


@pytest.fixture
def textgen(channels):
    return tokenizer_pb2_grpc.TextGenerationStub(channels[0])


@pytest.fixture
def tok_stub(channels):
    return tokenizer_pb2_grpc.TokenizerStub(channels[0])


@pytest.fixture
def engine_stub(channels):
    return engine_pb2_grpc.EngineStub(channels[1])


# -- helpers ------------------------------------------------------------------------------------------------


def request(text=None, messages=None, *, max_tokens=24, temperature=0.0, stop=(), ignore_eos=False, **fields):
    return tokenizer_pb2.GenerateRequest(
        text=text or "", messages=messages or [],
        sampling=engine_pb2.SamplingParams(temperature=temperature),
        stopping=engine_pb2.StoppingParams(max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos), **fields)


def collect(responses):
    """(text, token ids, last response) of a one-sample stream."""
    responses = list(responses)
    return "".join(r.text for r in responses), [t for r in responses for t in r.token_ids], responses[-1]


def as_dicts(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


def wait_idle(engine_stub, timeout=2.0):
    deadline = time.monotonic() + timeout
    while True:
        load = engine_stub.GetLoad(engine_pb2.GetLoadRequest())
        if load.kv_blocks_in_use == 0 and load.num_running == 0 and load.num_waiting == 0:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine is still busy after {timeout} s: {load}")
        time.sleep(0.01)


def load_of(engine: ServerProcess) -> engine_pb2.GetLoadResponse:
    with grpc.insecure_channel(engine.address) as channel:
        return engine_pb2_grpc.EngineStub(channel).GetLoad(engine_pb2.GetLoadRequest())


def health(address, service):
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status


def hf_greedy(hf, prompt_ids, max_new_tokens):
    _, model = hf
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def byte_token_ids(tokenizer, text):
    """The byte-level BPE tokens of each UTF-8 byte of `text` (GPT-2's byte-to-unicode map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    return [tokenizer.token_to_id(chars[b]) for b in text.encode()]


# -- text in, text out ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_greedy_text_equals_transformers_generate(textgen, hf, kind):
    hf_tok = hf[0]
    if kind == "text":
        prompt_ids = hf_tok.encode(PROMPT)
        req = request(PROMPT)
    else:
        rendered = hf_tok.apply_chat_template(as_dicts(CHAT), add_generation_prompt=True, tokenize=False)
        prompt_ids = hf_tok.encode(rendered, add_special_tokens=False)
        req = request(messages=CHAT)
    expected = hf_greedy(hf, prompt_ids, 24)
    text, ids, last = collect(textgen.Generate(req))
    assert ids == expected
    assert text == hf_tok.decode(expected, skip_special_tokens=True)
    stopped_on_eos = expected[-1] in hf[1].generation_config.eos_token_id
    assert last.finish_reason == (engine_pb2.FINISH_REASON_STOP if stopped_on_eos else engine_pb2.FINISH_REASON_LENGTH)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt_ids), len(expected))


MULTIBYTE_RUNS = [  # (temperature, seed, characters whose UTF-8 bytes get a large logit bias)
    (1.0, 1, ""), (1.3, 2, ""), (0.7, 3, ""),  # as the model samples: lone high bytes here and there
    (1.0, 4, "é"), (0.8, 5, "日"), (1.3, 6, "é日"),  # byte soup: characters split over tokens, and broken ones
]


def test_deltas_concatenate_to_the_full_decode_on_multibyte_text(textgen, tokenizer, hf_tok):
    assembled = broken = 0
    for temperature, seed, chars in MULTIBYTE_RUNS:
        req = request(PROMPT, max_tokens=60, temperature=temperature, ignore_eos=True)
        req.sampling.seed = seed
        req.sampling.logit_bias.update({i: 20.0 for i in byte_token_ids(tokenizer, chars)})
        responses = list(textgen.Generate(req))
        ids = [t for r in responses for t in r.token_ids]
        full = hf_tok.decode(ids, skip_special_tokens=True)
        assert "".join(r.text for r in responses) == full, (temperature, seed, chars)
        position = 0
        for r in responses:  # each delta is its own slice of the full text: no U+FFFD that the full text lacks
            assert r.text == full[position:position + len(r.text)]
            position += len(r.text)
        assembled += sum(full.count(c) for c in chars)
        broken += full.count("\ufffd")
    assert assembled and broken  # really exercised: characters split over tokens, and lone bytes


# -- stop strings ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_run(channels, tokenizer):
    """A 40-token greedy output without stop strings, and a stop string spanning three of its tokens."""
    stub = tokenizer_pb2_grpc.TextGenerationStub(channels[0])
    text, ids, last = collect(stub.Generate(request(PROMPT, max_tokens=40, ignore_eos=True)))
    for k in range(8, len(ids) - 3):
        stop = tokenizer.decode(ids[k:k + 3], True)
        clean = tokenizer.decode(ids[:k], True) + stop == tokenizer.decode(ids[:k + 3], True)
        if clean and stop.strip() and "\ufffd" not in stop:
            return text, ids, last, stop
    pytest.fail(f"no clean 3-token stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_text_and_aborts_the_engine_request(textgen, engine_stub, tokenizer, greedy_run, include):
    full, ids, _, stop = greedy_run
    at = full.index(stop)
    # Long max_tokens: had the match not aborted the engine request it would run for seconds more.
    req = request(PROMPT, max_tokens=LONG, stop=[stop], ignore_eos=True)
    req.stopping.include_stop_str_in_output = include
    responses = list(textgen.Generate(req))
    text, out_ids, last = collect(responses)
    assert text == full[:at + len(stop) if include else at]
    assert last.finish_reason == engine_pb2.FINISH_REASON_STOP and last.matched_stop == stop
    assert all(not r.matched_stop and not r.finish_reason for r in responses[:-1])
    # The greedy tokens up to (at least) the one completing the stop string, and no further than the 40 we know.
    completes = next(m for m in range(len(ids) + 1) if stop in tokenizer.decode(ids[:m], True))
    assert out_ids == ids[:len(out_ids)] and completes <= len(out_ids) < len(ids)
    assert last.usage.completion_tokens == len(out_ids)
    assert last.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    wait_idle(engine_stub, timeout=1.0)


def test_a_stop_string_abort_ends_only_its_own_call_among_calls_sharing_a_request_id(textgen, greedy_run):
    """Each call is its own request at the engine (the tokenizer tags it), so the Abort that one call's stop
    string sends leaves another client's call under the same request_id running to its end."""
    full, ids, _, stop = greedy_run
    bystander = textgen.Generate(request(PROMPT, max_tokens=60, ignore_eos=True, request_id="shared"))
    first = next(bystander)
    stopped = list(textgen.Generate(request(PROMPT, max_tokens=LONG, stop=[stop], ignore_eos=True,
                                            request_id="shared")))
    assert stopped[-1].finish_reason == engine_pb2.FINISH_REASON_STOP
    rest = list(bystander)
    assert rest[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 60
    assert [*first.token_ids, *(t for r in rest for t in r.token_ids)][:len(ids)] == ids
    assert {r.request_id for r in [first, *rest, *stopped]} == {"shared"}


def test_the_earliest_of_several_stop_strings_wins(textgen, greedy_run):
    full, _, _, stop = greedy_run
    end = full.index(stop) + len(stop)
    # Listed first, but it first appears after `stop` ends.
    later = next(full[i:i + 2] for i in range(end, len(full) - 1)
                 if full.index(full[i:i + 2]) >= end and full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    text, _, last = collect(textgen.Generate(request(PROMPT, max_tokens=40, stop=[later, stop], ignore_eos=True)))
    assert last.matched_stop == stop and text == full[:full.index(stop)]


def test_stop_strings_that_never_complete_change_nothing(textgen, tokenizer, greedy_run):
    full, ids, plain_last, stop = greedy_run
    # The second one is a partial match: held back while it could still complete, then released.
    stops = ["\u2603 never in the output", stop + "\u2603"]
    held = 0
    # A message boundary right after `stop` shows the hold-back; a loaded machine may merge that step's message
    # with the next (a lagging stream gets its tokens in one message), so try a few times to see one.
    for _ in range(5):
        responses = list(textgen.Generate(request(PROMPT, max_tokens=40, stop=stops, ignore_eos=True)))
        text, out_ids, last = collect(responses)
        assert (text, out_ids) == (full, ids)
        assert last.finish_reason == plain_last.finish_reason == engine_pb2.FINISH_REASON_LENGTH
        assert last.matched_stop == "" and last.usage.completion_tokens == 40
        streamed, generated = "", []
        for r in responses:
            streamed += r.text
            generated += r.token_ids
            if tokenizer.decode(generated, True).endswith(stop):  # could still grow into stop + "\u2603"
                assert not streamed.endswith(stop)
                held += 1
        if held:
            break
    assert held


def test_every_one_of_n_samples_stops_at_the_stop_string(textgen, engine_stub, greedy_run):
    full, _, _, stop = greedy_run
    samples = {}
    for r in textgen.Generate(request(PROMPT, max_tokens=LONG, stop=[stop], ignore_eos=True, n=2)):
        samples.setdefault(r.index, []).append(r)
    assert sorted(samples) == [0, 1]
    for responses in samples.values():  # greedy: both samples are the greedy run, cut at the stop string
        assert "".join(r.text for r in responses) == full[:full.index(stop)]
        assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_STOP and responses[-1].matched_stop == stop
    wait_idle(engine_stub, timeout=1.0)  # each sample's engine request was aborted


# -- chat templates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template, messages", [
    (None, CONVERSATION), (LLAMA3, CONVERSATION), (MISTRAL, CONVERSATION[1:]),
], ids=["model's", "llama3", "mistral"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_equals_transformers(tok_stub, hf_tok, template, messages, add_generation_prompt):
    req = tokenizer_pb2.RenderChatRequest(messages=[tokenizer_pb2.ChatMessage(**m) for m in messages],
                                          add_generation_prompt=add_generation_prompt, chat_template=template)
    response = tok_stub.RenderChat(req)
    expected = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert response.prompt == expected
    assert list(response.token_ids) == hf_tok.encode(expected, add_special_tokens=False)


def test_render_chat_defaults_to_adding_the_generation_prompt(tok_stub, hf_tok):
    response = tok_stub.RenderChat(tokenizer_pb2.RenderChatRequest(messages=CHAT))
    assert response.prompt == hf_tok.apply_chat_template(as_dicts(CHAT), tokenize=False, add_generation_prompt=True)


BAD_CHATS = {  # name: (messages, chat_template)
    "unknown role": ([tokenizer_pb2.ChatMessage(role="wizard", content="hi")], None),
    "roles not alternating": ([tokenizer_pb2.ChatMessage(role="user", content="a")] * 2, MISTRAL),
    "template syntax error": (CHAT, "{% for m in messages %}{{ m.content }"),
    "template runtime error": (CHAT, "{{ messages[0].content + 1 }}"),
    "empty role": ([tokenizer_pb2.ChatMessage(role="", content="hi")], None),
}


@pytest.mark.parametrize("name", BAD_CHATS)
def test_a_failing_chat_template_is_invalid_argument_naming_messages(tok_stub, textgen, name):
    messages, template = BAD_CHATS[name]
    calls = [lambda: tok_stub.RenderChat(tokenizer_pb2.RenderChatRequest(messages=messages, chat_template=template)),
             lambda: list(textgen.Generate(request(messages=messages, chat_template=template)))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("messages")


# -- cancellation and deadlines through the tokenizer hop -----------------------------------------------------


def test_cancelling_the_text_stream_frees_the_engines_blocks(textgen, engine_stub):
    call = textgen.Generate(request(PROMPT, max_tokens=LONG, temperature=1.0, ignore_eos=True))
    next(call), next(call)
    assert engine_stub.GetLoad(engine_pb2.GetLoadRequest()).kv_blocks_in_use > 0
    call.cancel()
    wait_idle(engine_stub, timeout=1.0)


def test_an_expired_deadline_frees_the_engines_blocks(textgen, engine_stub):
    received = []
    with pytest.raises(grpc.RpcError) as error:
        for response in textgen.Generate(request(PROMPT, max_tokens=LONG, temperature=1.0, ignore_eos=True),
                                          timeout=1.0):
            received.append(response)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received  # it was generating when the deadline passed
    wait_idle(engine_stub, timeout=1.0)


# -- bad input ------------------------------------------------------------------------------------------------


def both_text_and_messages(r):
    r.messages.extend(CHAT)


BAD_GENERATE = [  # (change to a valid request, code, the field the message starts with)
    (both_text_and_messages, grpc.StatusCode.INVALID_ARGUMENT, "text"),
    (lambda r: r.ClearField("text"), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    (lambda r: r.stopping.stop.append(""), grpc.StatusCode.INVALID_ARGUMENT, "stopping.stop[0]"),
    (lambda r: r.stopping.stop.extend(["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "stopping.stop[1]"),
    (lambda r: setattr(r.sampling, "temperature", -0.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (lambda r: setattr(r.sampling, "top_p", 1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (lambda r: setattr(r.stopping, "max_tokens", MAX_MODEL_LEN), grpc.StatusCode.INVALID_ARGUMENT,
     "stopping.max_tokens"),
    (lambda r: (setattr(r, "text", "hello " * MAX_MODEL_LEN), r.stopping.ClearField("max_tokens")),
     grpc.StatusCode.OUT_OF_RANGE, "prompt_token_ids"),
    (lambda r: setattr(r.output, "logprobs", 10_000), grpc.StatusCode.INVALID_ARGUMENT, "output.logprobs"),
    (lambda r: (r.ClearField("text"), r.messages.extend(CHAT), setattr(r, "chat_template", "x" * (1 << 17))),
     grpc.StatusCode.INVALID_ARGUMENT, "chat_template"),
]


@pytest.mark.parametrize("mutate, code, field", BAD_GENERATE,
                         ids=[f"{c.name}-{f}-{i}" for i, (_, c, f) in enumerate(BAD_GENERATE)])
def test_bad_generate_input_gets_a_status_naming_the_field(textgen, mutate, code, field):
    req = request(PROMPT, max_tokens=4)
    mutate(req)
    with pytest.raises(grpc.RpcError) as error:
        list(textgen.Generate(req))
    assert error.value.code() == code
    assert error.value.details().startswith(field)
    assert collect(textgen.Generate(request(PROMPT, max_tokens=2)))[1]  # still serving


def test_detokenize_outside_the_vocabulary_is_invalid_argument(tok_stub, tokenizer):
    with pytest.raises(grpc.RpcError) as error:
        tok_stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[5, tokenizer.vocab_size]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("token_ids")
    assert tok_stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[5])).text  # still serving


# -- n > 1 ----------------------------------------------------------------------------------------------------


def test_n_samples_are_multiplexed_by_index_and_each_finishes(textgen, hf_tok):
    req = request(PROMPT, max_tokens=12, temperature=1.0, ignore_eos=True, n=3, request_id="three")
    req.sampling.seed = 11
    req.output.logprobs = 0
    req.output.prompt_logprobs = 0

    def run():
        samples = {}
        for r in textgen.Generate(req):
            assert r.request_id == "three"
            assert len(r.logprobs) == len(r.token_ids)
            samples.setdefault(r.index, []).append(r)
        return samples

    samples = run()
    assert sorted(samples) == [0, 1, 2]
    for index, responses in samples.items():
        ids = [t for r in responses for t in r.token_ids]
        assert "".join(r.text for r in responses) == hf_tok.decode(ids, skip_special_tokens=True)
        assert [bool(r.finish_reason) for r in responses] == [False] * (len(responses) - 1) + [True]
        assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
        assert responses[-1].usage.completion_tokens == len(ids) == 12
        # Prompt logprobs come once, on the first response of index 0: one per prompt token after the first.
        assert [i for i, r in enumerate(responses) if r.prompt_logprobs] == ([0] if index == 0 else [])
    assert len(samples[0][0].prompt_logprobs) == len(hf_tok.encode(PROMPT)) - 1
    token_ids = {i: [t for r in rs for t in r.token_ids] for i, rs in samples.items()}
    assert len({tuple(ids) for ids in token_ids.values()}) == 3  # distinct samples
    assert {i: [t for r in rs for t in r.token_ids] for i, rs in run().items()} == token_ids  # seeded: reproducible


# -- Tokenizer RPCs against transformers, as direct servicer calls ---------------------------------------------


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """The grpc.aio ServicerContext the Tokenizer RPCs use: abort() ends the call with a status."""

    async def abort(self, code, details=""):
        raise Aborted(code, details)


@pytest.fixture(scope="module")
def servicer(tokenizer):
    return TokenizerService(tokenizer)


def call(servicer, method, request):
    return asyncio.run(getattr(servicer, method)(request, FakeContext()))


@pytest.mark.parametrize("add_special_tokens", [None, True, False])
@pytest.mark.parametrize("text", TEXTS + ["<|im_start|>user\nhé<|im_end|>", PROMPT])
def test_tokenize_with_offsets_equals_transformers(servicer, hf_tok, text, add_special_tokens):
    req = tokenizer_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens, return_offsets=True)
    response = call(servicer, "Tokenize", req)
    expected = hf_tok(text, add_special_tokens=add_special_tokens is not False, return_offsets_mapping=True)
    assert list(response.token_ids) == expected["input_ids"]
    assert [(o.start, o.end) for o in response.offsets] == [tuple(o) for o in expected["offset_mapping"]]
    assert not call(servicer, "Tokenize", tokenizer_pb2.TokenizeRequest(text=text)).offsets  # only when asked


@pytest.mark.parametrize("skip_special_tokens", [None, True, False])
def test_detokenize_equals_transformers(servicer, hf_tok, skip_special_tokens):
    generator = torch.Generator().manual_seed(0)
    id_lists = [hf_tok.encode(text) for text in TEXTS] + [[0, 1, 5, 2, 3, 70]]
    id_lists += [torch.randint(0, len(hf_tok), (30,), generator=generator).tolist() for _ in range(5)]
    for ids in id_lists:
        response = call(servicer, "Detokenize", tokenizer_pb2.DetokenizeRequest(
            token_ids=ids, skip_special_tokens=skip_special_tokens))
        assert response.text == hf_tok.decode(ids, skip_special_tokens=skip_special_tokens is not False)


def test_tokenizer_info_equals_transformers(servicer, hf_tok, model_dir):
    from transformers import GenerationConfig

    info = call(servicer, "GetTokenizerInfo", tokenizer_pb2.GetTokenizerInfoRequest())
    assert info.vocab_size == len(hf_tok)
    assert info.HasField("bos_token") == (hf_tok.bos_token is not None)
    eos = list(dict.fromkeys([hf_tok.eos_token_id, *GenerationConfig.from_pretrained(model_dir).eos_token_id]))
    assert [(t.id, t.text) for t in info.eos_tokens] == [(i, hf_tok.convert_ids_to_tokens(i)) for i in eos]
    assert [(t.id, t.text) for t in info.special_tokens] == [
        (i, hf_tok.convert_ids_to_tokens(i)) for i in sorted(hf_tok.all_special_ids)]
    assert info.has_chat_template and hf_tok.chat_template is not None
    assert info.model_max_length == hf_tok.model_max_length


def test_a_model_without_a_chat_template_needs_an_override(tmp_path, hf_tok):
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(DEMO / "tokenizer.json", tmp_path / "tokenizer.json")
    sandbox = ChatSandbox(SandboxLimits(processes=1))  # the override is a client's template
    servicer = TokenizerService(Tokenizer(tmp_path), sandbox=sandbox)
    try:
        assert not call(servicer, "GetTokenizerInfo", tokenizer_pb2.GetTokenizerInfoRequest()).has_chat_template
        with pytest.raises(Aborted) as error:
            call(servicer, "RenderChat", tokenizer_pb2.RenderChatRequest(messages=CHAT))
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION and error.value.details.startswith("messages")
        rendered = call(servicer, "RenderChat", tokenizer_pb2.RenderChatRequest(messages=CHAT, chat_template=LLAMA3))
        assert rendered.prompt == hf_tok.apply_chat_template(as_dicts(CHAT), chat_template=LLAMA3, tokenize=False,
                                                             add_generation_prompt=True)
    finally:
        sandbox.close()


def test_tokenizer_rpcs_over_the_wire_match_the_servicer(tok_stub, servicer):
    req = tokenizer_pb2.TokenizeRequest(text=PROMPT, return_offsets=True)
    assert tok_stub.Tokenize(req) == call(servicer, "Tokenize", req)
    info = tokenizer_pb2.GetTokenizerInfoRequest()
    assert tok_stub.GetTokenizerInfo(info) == call(servicer, "GetTokenizerInfo", info)


# -- routing over several engines -------------------------------------------------------------------------------


def test_concurrent_requests_spread_over_both_engines(model_dir, engine, second_engine):
    with tokenizer_process(model_dir, second_engine, engine) as front, grpc.insecure_channel(front.address) as channel:
        textgen = tokenizer_pb2_grpc.TextGenerationStub(channel)
        calls = [textgen.Generate(request(PROMPT, max_tokens=LONG, temperature=1.0, ignore_eos=True))
                 for _ in range(4)]
        try:
            for c in calls:
                next(c)  # all four are generating
            running = [load_of(e).num_running for e in (second_engine, engine)]
            assert sum(running) == 4 and all(running), running
        finally:
            for c in calls:
                c.cancel()
    for e in (second_engine, engine):
        with grpc.insecure_channel(e.address) as channel:
            wait_idle(engine_pb2_grpc.EngineStub(channel))


def test_failover_when_an_engine_dies_and_unavailable_when_all_are_down(model_dir, engine, second_engine, textgen,
                                                                        tokenizer):
    expected = collect(textgen.Generate(request(PROMPT, max_tokens=8)))[:2]
    both = tokenizer_process(model_dir, second_engine, engine)
    only = tokenizer_process(model_dir, second_engine)
    with both, only, grpc.insecure_channel(both.address) as a, grpc.insecure_channel(only.address) as b:
        second_engine.process.kill()
        second_engine.process.wait()
        # Until its next poll (0.5 s) `both` believes the dead engine is up and, listed first, tries it first.
        survivor = tokenizer_pb2_grpc.TextGenerationStub(a)
        for _ in range(3):
            assert collect(survivor.Generate(request(PROMPT, max_tokens=8)))[:2] == expected
        assert health(both.address, TEXT_GENERATION) == health_pb2.HealthCheckResponse.SERVING

        with pytest.raises(grpc.RpcError) as error:
            list(tokenizer_pb2_grpc.TextGenerationStub(b).Generate(request(PROMPT, max_tokens=8)))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 5
        while health(only.address, TEXT_GENERATION) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "TextGeneration still SERVING with every engine down"
            time.sleep(0.05)
        assert health(only.address, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(only.address, TOKENIZER) == health_pb2.HealthCheckResponse.SERVING
        tokenized = tokenizer_pb2_grpc.TokenizerStub(b).Tokenize(tokenizer_pb2.TokenizeRequest(text=PROMPT))
        assert list(tokenized.token_ids) == tokenizer.encode(PROMPT)  # text work goes on without engines


def test_a_draining_tokenizer_says_not_serving_refuses_new_calls_and_finishes_its_streams(model_dir, engine):
    """SIGTERM: health on a new connection says NOT_SERVING, new calls get UNAVAILABLE, the in-flight text stream
    runs to its end, and the process exits 0 then (not after the grace period)."""
    server = ServerProcess("tokenizer", "--model", str(model_dir), f"--engine={engine.address}", "--grace", "120")
    with server, grpc.insecure_channel(server.address) as channel:
        running = tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(
            request(PROMPT, max_tokens=LONG, ignore_eos=True))
        first = next(running)
        server.process.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(server.address) as fresh:
            deadline = time.monotonic() + 10
            while (status := health(server.address, "")) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, f"{status} 10 s after SIGTERM"
                time.sleep(0.02)
            assert health(server.address, TEXT_GENERATION) == health_pb2.HealthCheckResponse.NOT_SERVING
            for rpc in (lambda: list(tokenizer_pb2_grpc.TextGenerationStub(fresh).Generate(request(PROMPT), timeout=10)),
                        lambda: tokenizer_pb2_grpc.TokenizerStub(fresh).Tokenize(
                            tokenizer_pb2.TokenizeRequest(text=PROMPT), timeout=10)):
                with pytest.raises(grpc.RpcError) as error:
                    rpc()
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in error.value.details()
        rest = list(running)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == LONG
        assert rest[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
        assert server.process.wait(60) == 0


def test_a_full_engine_is_skipped_and_all_full_is_resource_exhausted(model_dir):
    """An engine at its queue limit refuses with RESOURCE_EXHAUSTED: the tokenizer tries the next one, and
    reports RESOURCE_EXHAUSTED (retry later), not UNAVAILABLE, when every engine is full."""
    full = ServerProcess("engine", "--model", str(model_dir), "--max-num-seqs", "1", "--max-queue", "0").start()
    spare = engine_process(model_dir).start()
    try:
        long_request = engine_pb2.GenerateRequest(
            prompt_token_ids=[5, 6, 7], sampling=engine_pb2.SamplingParams(temperature=0.0),
            stopping=engine_pb2.StoppingParams(max_tokens=LONG, ignore_eos=True))
        with grpc.insecure_channel(full.address) as channel, grpc.insecure_channel(spare.address) as spare_channel:
            # The full engine runs 1 request, the spare 2: the router tries the full one first.
            occupying = [stub.Generate(long_request) for stub in (engine_pb2_grpc.EngineStub(channel),
                         engine_pb2_grpc.EngineStub(spare_channel), engine_pb2_grpc.EngineStub(spare_channel))]
            for call in occupying:
                next(call)
            for engines, expected in (((full,), grpc.StatusCode.RESOURCE_EXHAUSTED), ((full, spare), None)):
                with tokenizer_process(model_dir, *engines) as front_door, \
                        grpc.insecure_channel(front_door.address) as front_channel:
                    stub = tokenizer_pb2_grpc.TextGenerationStub(front_channel)
                    if expected is None:
                        assert collect(stub.Generate(request("def f():", max_tokens=4)))[-1].finish_reason
                    else:
                        with pytest.raises(grpc.RpcError) as error:
                            list(stub.Generate(request("def f():", max_tokens=4)))
                        assert error.value.code() == expected
            for call in occupying:
                call.cancel()
    finally:
        full.stop()
        spare.stop()
