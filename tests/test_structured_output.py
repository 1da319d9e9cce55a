"""Structured outputs: JSON Schema, JSON object, regex, GBNF grammar and choice constraints, end to end.

Two models: the shipped demo model (a real tokenizer, text of some shape) and a random-weight model with the same
tokenizer, whose unconstrained text is garbage, so its outputs only parse and validate if the mask does the work.
Outputs are checked with real validators (json + jsonschema, re.fullmatch), never against stored strings.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import grpc
import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from servers import ServerProcess
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.request import FinishReason
from tessera.engine.structured_output import StructuredOutput
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.sampling_params import InvalidParam, SamplingParams
from tessera.step import plan_from_proto, plan_to_proto, StepPlan
from tessera.worker.sampler import Sampler, SamplingRow, apply_token_masks, unpack_bitmask
from tiny_checkpoints import make_tiny_checkpoint

DEMO = Path(__file__).resolve().parent.parent / "models" / "tessera-demo"
EOS = 0  # the demo tokenizer's <|endoftext|>
PROMPTS = ["def load(path):\n    return ", "config = ", "# the answer, as JSON:\n", "x"]

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["id", "tags"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
     "required": ["ok", "note"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "login": {"type": "string", "pattern": "^[a-z]{3,8}$"},
        "uid": {"type": "integer", "minimum": 1000, "maximum": 65535}}, "required": ["login", "uid"]}},
     "required": ["user"]},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 2, "maxItems": 5},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                      "city": {"type": "string", "maxLength": 12}}, "required": ["zip"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"]},
    {"type": "object", "properties": {"kind": {"const": "event"}, "level": {"enum": [1, 2, 3]}},
     "required": ["kind", "level"]},
    {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["a"]},
               {"type": "object", "properties": {"b": {"type": "string", "maxLength": 4}}, "required": ["b"]}]},
    {"type": "object", "properties": {"points": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x", "y"]}}}, "required": ["points"]},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 2, "maxLength": 10},
                                      "draft": {"type": "boolean"}}, "required": ["title"]},
    {"type": "string", "enum": ["alpha", "beta", "gamma"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"status": {"enum": ["open", "closed"]},
                                      "count": {"type": "integer", "minimum": 0, "maximum": 100},
                                      "owner": {"type": "string", "maxLength": 10}},
     "required": ["status", "count"]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"]},
    {"$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                        "required": ["sku", "qty"]}},
     "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"},
                                                "minItems": 1, "maxItems": 2}},
     "required": ["items"]},
    {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                      "lon": {"type": "number", "minimum": -180, "maximum": 180}},
     "required": ["lat", "lon"]},
    {"type": "object", "properties": {"value": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "boolean"}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                                      "label": {"type": "string", "maxLength": 6}},
     "required": ["flags", "label"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "object", "properties": {"meta": {"type": "object", "properties": {
        "version": {"type": "integer", "minimum": 1, "maximum": 3},
        "source": {"enum": ["api", "cli"]}}, "required": ["version"]}, "ok": {"type": "boolean"}},
     "required": ["meta", "ok"]},
]

REGEXES = [r"[a-z]{1,12}@[a-z]{1,8}\.(com|org)", r"\d{3}-\d{4}", r"(yes|no), because [a-z ]{1,20}\.", r"0x[0-9a-f]{2,8}"]
GRAMMAR = '''root ::= expr
expr ::= term (" + " term){0,3}
term ::= [1-9] [0-9]? | "(" product ")"
product ::= [1-9] (" * " [1-9]){1,2}'''
EXPRESSION = re.compile(r"(\d{1,2}|\(\d( \* \d){1,2}\))( \+ (\d{1,2}|\(\d( \* \d){1,2}\))){0,3}")


CHOICES = ("positive", "negative", "neutral", "mixed feelings")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DEMO / "tokenizer.json"))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """Random weights, the demo model's tokenizer: its free text is garbage."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("random-demo-vocab"), "llama", vocab_size=8192,
                                bos_token_id=None, eos_token_id=EOS, max_position_embeddings=1024,
                                tie_word_embeddings=True, generation=dict(eos_token_id=EOS), std=0.05)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO / name, path / name)
    return path


@pytest.fixture(scope="module", params=["demo", "random"])
def engine(request, random_model) -> LLMEngine:
    model = DEMO if request.param == "demo" else random_model
    return LLMEngine(EngineConfig(model=str(model), kv_cache_memory=64 << 20))


def prompts_for(tokenizer, count):
    return [tokenizer.encode(PROMPTS[i % len(PROMPTS)]).ids for i in range(count)]


def text_of(tokenizer, completion) -> str:
    ids = completion.token_ids[:-1] if completion.token_ids[-1:] == [EOS] else completion.token_ids
    return tokenizer.decode(ids, skip_special_tokens=False)


def greedy_and_seeded(count):
    return [SamplingParams(temperature=0.0, max_tokens=256)] * count + [
        SamplingParams(temperature=1.0, top_p=0.95, seed=i, max_tokens=256) for i in range(count)]


def test_json_schema_outputs_parse_and_validate(engine, tokenizer):
    specs = [StructuredOutput(json_schema=json.dumps(s)) for s in SCHEMAS] * 2
    completions = engine.generate(prompts_for(tokenizer, len(specs)), greedy_and_seeded(len(SCHEMAS)), specs)
    for schema, completion in zip(SCHEMAS * 2, completions):
        assert completion.finish_reason is FinishReason.STOP, (schema, text_of(tokenizer, completion))
        assert completion.token_ids[-1] == EOS  # the grammar was complete: EOS forced
        jsonschema.validate(json.loads(text_of(tokenizer, completion)), schema)
    assert engine.kv.num_blocks_in_use == 0


def test_json_object_regex_grammar_and_choice_outputs(engine, tokenizer):
    specs = ([StructuredOutput(regex=r) for r in REGEXES]
             + [StructuredOutput(grammar=GRAMMAR), StructuredOutput(choice=CHOICES)])
    if engine.config.model == str(DEMO):
        # Any JSON object has strings without bounds, which a random model may well never close.
        specs.append(StructuredOutput(json_object=True))
    completions = engine.generate(prompts_for(tokenizer, 2 * len(specs)), greedy_and_seeded(len(specs)), specs * 2)
    for spec, completion in zip(specs * 2, completions):
        text = text_of(tokenizer, completion)
        assert completion.finish_reason is FinishReason.STOP, (spec, text)
        if spec.json_object:
            assert isinstance(json.loads(text), dict)
        elif spec.regex:
            assert re.fullmatch(spec.regex, text), (spec.regex, text)
        elif spec.grammar:
            assert EXPRESSION.fullmatch(text), text
        else:
            assert text in CHOICES


def test_the_random_model_writes_garbage_without_the_constraint(random_model, tokenizer):
    engine = LLMEngine(EngineConfig(model=str(random_model), kv_cache_memory=16 << 20))
    completions = engine.generate(prompts_for(tokenizer, 4), SamplingParams(temperature=0.0, max_tokens=24))
    for completion in completions:
        with pytest.raises(ValueError):
            json.loads(text_of(tokenizer, completion))


def test_any_whitespace_still_gives_valid_json(engine, tokenizer):
    schema = SCHEMAS[1]
    spec = StructuredOutput(json_schema=json.dumps(schema), any_whitespace=True)
    for completion in engine.generate(prompts_for(tokenizer, 4), greedy_and_seeded(2), spec):
        jsonschema.validate(json.loads(text_of(tokenizer, completion)), schema)


def test_the_grammar_ends_the_request_over_ignore_eos_and_min_tokens(engine, tokenizer):
    spec = StructuredOutput(choice=("ok",))
    [completion] = engine.generate(prompts_for(tokenizer, 1),
                                   SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, min_tokens=20), spec)
    assert completion.finish_reason is FinishReason.STOP
    assert text_of(tokenizer, completion) == "ok" and completion.token_ids[-1] == EOS


def test_max_tokens_cuts_a_constrained_output_to_a_valid_prefix(engine, tokenizer):
    [completion] = engine.generate(prompts_for(tokenizer, 1), SamplingParams(temperature=0.0, max_tokens=3),
                                   StructuredOutput(json_schema=json.dumps(SCHEMAS[0])))
    assert completion.finish_reason is FinishReason.LENGTH and len(completion.token_ids) == 3
    assert text_of(tokenizer, completion).startswith("{")


def test_alone_and_in_a_mixed_batch_with_preemption_the_tokens_are_the_same(random_model, tokenizer):
    """32 requests, constrained and not, greedy and seeded, on few KV blocks (preemption forced)."""
    specs = [StructuredOutput(json_schema=json.dumps(SCHEMAS[i % len(SCHEMAS)])) if i % 2 == 0 else
             StructuredOutput(regex=REGEXES[i % len(REGEXES)]) if i % 4 == 1 else None for i in range(32)]
    params = [SamplingParams(temperature=0.0, max_tokens=48) if i % 3 else
              SamplingParams(temperature=0.9, seed=i, max_tokens=48) for i in range(32)]
    prompts = prompts_for(tokenizer, 32)
    config = dict(model=str(random_model), block_size=4, max_num_batched_tokens=64)
    alone = [LLMEngine(EngineConfig(**config)).generate([p], [s], [c])[0]
             for p, s, c in zip(prompts[:6], params[:6], specs[:6])]
    crowded = LLMEngine(EngineConfig(**config, num_kv_blocks=40))
    batch = crowded.generate(prompts, params, specs)
    assert crowded.scheduler.num_preemptions > 0
    assert [c.token_ids for c in batch[:6]] == [c.token_ids for c in alone]
    roomy = LLMEngine(EngineConfig(**config)).generate(prompts, params, specs)
    assert [c.token_ids for c in batch] == [c.token_ids for c in roomy]
    assert crowded.kv.num_blocks_in_use == 0


def test_prefix_caching_and_chunked_prefill_keep_the_constraint(random_model, tokenizer):
    prompt = tokenizer.encode("config = " * 40).ids  # several chunks of 16 tokens, then a cached prefix
    spec = StructuredOutput(json_schema=json.dumps(SCHEMAS[4]))
    engine = LLMEngine(EngineConfig(model=str(random_model), block_size=4, max_num_batched_tokens=16))
    first, second = (engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=200), spec)[0]
                     for _ in range(2))
    assert second.usage.cached_tokens > 0 and first.token_ids == second.token_ids
    jsonschema.validate(json.loads(text_of(tokenizer, first)), SCHEMAS[4])


def test_compiled_constraints_are_cached(engine):
    spec = StructuredOutput(json_schema=json.dumps(SCHEMAS[2]))
    assert engine.grammars.compile(spec) is engine.grammars.compile(StructuredOutput(json_schema=json.dumps(SCHEMAS[2])))


@pytest.mark.parametrize("spec, field, reason", [
    (StructuredOutput(json_schema='{"type": "objekt"}'), "structured_output.json_schema", "Unsupported type"),
    (StructuredOutput(json_schema='{"type": '), "structured_output.json_schema", "not valid JSON"),
    (StructuredOutput(json_schema="  "), "structured_output.json_schema", "must not be empty"),
    (StructuredOutput(regex="(abc"), "structured_output.regex", "parenthesis is not closed"),
    (StructuredOutput(grammar='root ::= item\nother ::= "x"'), "structured_output.grammar", 'Rule "item" is not defined'),
    (StructuredOutput(grammar='start ::= "x"'), "structured_output.grammar", 'root rule with name "root"'),
    (StructuredOutput(choice=()), "structured_output.choice", "at least one choice"),
    (StructuredOutput(choice=("a", "")), "structured_output.choice", "must not be empty"),
    (StructuredOutput(regex="a+", grammar='root ::= "a"'), "structured_output", "exactly one of"),
    (StructuredOutput(json_object=True, choice=("a",)), "structured_output", "exactly one of"),
])
def test_bad_constraints_are_refused_naming_the_field_and_reason(random_model, spec, field, reason):
    engine = LLMEngine(EngineConfig(model=str(random_model), kv_cache_memory=8 << 20))
    with pytest.raises(InvalidParam) as error:
        engine.add_request([5, 6, 7], SamplingParams(), structured_output=spec)
    assert error.value.field == field and reason in str(error.value), str(error.value)
    assert not engine.has_unfinished_requests()


# -- the sampler: masked sampling never picks a disallowed token ------------------------------------------------

VOCAB = 100


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_masked_sampling_never_picks_a_disallowed_token(data):
    n = data.draw(st.integers(1, 6))
    rows, masks = [], torch.zeros((n, (VOCAB + 31) // 32), dtype=torch.int32)
    for i in range(n):
        allowed = data.draw(st.sets(st.integers(0, VOCAB - 1), min_size=1, max_size=8))
        for token in allowed:
            masks[i, token // 32] |= torch.tensor(1 << (token % 32), dtype=torch.int64).to(torch.int32)
        params = SamplingParams(
            temperature=data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
            top_k=data.draw(st.sampled_from([0, 1, 5])), top_p=data.draw(st.sampled_from([1.0, 0.9, 0.3])),
            min_p=data.draw(st.sampled_from([0.0, 0.2])), seed=data.draw(st.sampled_from([None, 3])),
            repetition_penalty=data.draw(st.sampled_from([1.0, 1.5])),
            presence_penalty=data.draw(st.sampled_from([0.0, 1.0])),
            frequency_penalty=data.draw(st.sampled_from([0.0, -1.0])),
            # a large bias on a disallowed token must not bring it back
            logit_bias={data.draw(st.integers(0, VOCAB - 1)): 100.0},
            min_tokens=data.draw(st.sampled_from([0, 5])), max_tokens=10)
        rows.append((SamplingRow(params, [1, 2, 3], [4, 5]), allowed))
    logits = torch.randn(n, VOCAB) * 5
    out = Sampler(VOCAB, eos_token_ids=[0])(logits, [row for row, _ in rows], masks)
    for token, (_, allowed) in zip(out.token_ids.tolist(), rows):
        assert token in allowed


def test_min_tokens_never_bans_the_only_tokens_the_mask_allows():
    """A complete grammar allows only EOS; min_tokens must not turn that row into nothing at all."""
    eos = 7
    masks = torch.zeros((2, (VOCAB + 31) // 32), dtype=torch.int32)
    masks[:, 0] = 1 << eos  # EOS only
    masks[1, 1] = 1 << 3  # ... or token 35 for the second row: there min_tokens does ban EOS
    rows = [SamplingRow(SamplingParams(temperature=t, min_tokens=5, seed=1), [1, 2], [3]) for t in (0.0, 1.0)]
    out = Sampler(VOCAB, eos_token_ids=[eos])(torch.randn(2, VOCAB), rows, masks)
    assert out.token_ids.tolist() == [eos, 35]


def test_unpack_bitmask_reads_bit_j_of_word_i_as_token_32i_plus_j():
    words = torch.tensor([[1 | (1 << 31), 0, 1 << 5]], dtype=torch.int64).to(torch.int32)
    assert unpack_bitmask(words, 70)[0].nonzero().flatten().tolist() == [0, 31, 69]


def test_applying_masks_equals_the_bitwise_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 100) * 3
    masks = torch.randint(-2**31, 2**31 - 1, (5, 4), dtype=torch.int64).to(torch.int32)
    masks[1] = -1  # all allowed
    masks[2] = 0  # nothing allowed
    expected = logits.masked_fill(~unpack_bitmask(masks, 100), float("-inf"))
    assert torch.equal(apply_token_masks(logits, masks), expected)


def test_token_masks_travel_over_the_worker_protocol():
    mask = torch.tensor([-1, 0, 123456, -(2**31)], dtype=torch.int32)
    back = plan_from_proto(plan_to_proto(StepPlan(token_masks={"r": mask})))
    assert torch.equal(back.token_masks["r"], mask)


# -- over gRPC ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_server(random_model):
    with ServerProcess("engine", "--model", str(random_model), "--kv-cache-memory", "16MiB") as server:
        yield server


@pytest.fixture(scope="module")
def stub(engine_server):
    with grpc.insecure_channel(engine_server.address) as channel:
        yield engine_pb2_grpc.EngineStub(channel)


def constrained(structured_output, max_tokens=200, **fields):
    return engine_pb2.GenerateRequest(prompt_token_ids=[5, 17, 33], sampling=engine_pb2.SamplingParams(temperature=0),
                                      stopping=engine_pb2.StoppingParams(max_tokens=max_tokens),
                                      structured_output=structured_output, **fields)


def test_engine_generate_with_a_schema_over_grpc(stub, tokenizer):
    schema = SCHEMAS[0]
    responses = list(stub.Generate(constrained(engine_pb2.StructuredOutput(json_schema=json.dumps(schema)), n=2)))
    for index in (0, 1):
        ids = [t for r in responses if r.index == index for t in r.token_ids]
        assert ids[-1] == EOS
        jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), schema)
    assert {r.finish_reason for r in responses if r.finish_reason} == {engine_pb2.FINISH_REASON_STOP}


@pytest.mark.parametrize("constraint, field, reason", [
    (engine_pb2.StructuredOutput(json_schema='{"type": "objekt"}'), "structured_output.json_schema", "Unsupported"),
    (engine_pb2.StructuredOutput(json_schema="{"), "structured_output.json_schema", "not valid JSON"),
    (engine_pb2.StructuredOutput(regex="[a-"), "structured_output.regex", ""),
    (engine_pb2.StructuredOutput(grammar="root ::= nothing"), "structured_output.grammar", "not defined"),
    (engine_pb2.StructuredOutput(choice=engine_pb2.Choice()), "structured_output.choice", "at least one"),
])
def test_bad_constraints_over_grpc_are_invalid_argument(stub, constraint, field, reason):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(constrained(constraint)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field + ":") and reason in error.value.details()
    assert stub.GetLoad(engine_pb2.GetLoadRequest()).kv_blocks_in_use == 0


def test_a_compilation_over_the_time_limit_is_invalid_argument(random_model):
    # An enum of 20000 strings: ~4.6 s to compile on a 2-core Xeon, 15x the limit.
    slow = {"enum": [f"value number {i}" for i in range(20000)]}
    with ServerProcess("engine", "--model", str(random_model), "--kv-cache-memory", "8MiB",
                       "--structured-output-timeout", "0.3") as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        list(stub.Generate(constrained(engine_pb2.StructuredOutput(regex="ab"), max_tokens=3)))  # the vocabulary
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(constrained(engine_pb2.StructuredOutput(json_schema=json.dumps(slow)))))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "structured_output.json_schema: compiling the constraint took longer than" in error.value.details()
        # unconstrained requests are unaffected
        assert list(stub.Generate(constrained(None)))[-1].finish_reason


def test_cancelling_a_constrained_stream_frees_everything(stub):
    schema = {"type": "array", "items": {"type": "string"}}  # long: ends by max_tokens or by the cancel
    call = stub.Generate(constrained(engine_pb2.StructuredOutput(json_schema=json.dumps(schema)), max_tokens=900))
    next(call)
    call.cancel()
    for _ in range(200):
        load = stub.GetLoad(engine_pb2.GetLoadRequest())
        if load.num_running == 0 and load.kv_blocks_in_use == 0:
            break
        time.sleep(0.02)
    assert (load.num_running, load.kv_blocks_in_use) == (0, 0)


def test_length_bounded_strings_are_json_strings(engine):
    """xgrammar 0.2 lets raw control characters into a string with maxLength (its #800): mended."""
    compiled = engine.grammars.compile(StructuredOutput(json_schema='{"type": "string", "maxLength": 3}'))

    def accepts(text):
        matcher = compiled.matcher()
        return matcher.accept_string(text) and matcher.is_completed()

    assert accepts('"xyz"') and accepts('"é c"') and accepts('""')
    assert not accepts('"a\x08"') and not accepts('"a\tb"') and not accepts('"a\x1f"') and not accepts('"abcd"')


def test_a_remote_worker_applies_the_masks_it_receives(random_model, tokenizer):
    from tessera.engine.remote_worker import RemoteWorker

    specs = [StructuredOutput(json_schema=json.dumps(SCHEMAS[i])) for i in range(6)] + [
        StructuredOutput(choice=CHOICES), None]
    params = greedy_and_seeded(4)
    prompts = prompts_for(tokenizer, 8)
    local = LLMEngine(EngineConfig(model=str(random_model), kv_cache_memory=8 << 20)).generate(prompts, params, specs)
    with ServerProcess("worker", "--model", str(random_model), "--kv-cache-memory", "8MiB") as process:
        worker = RemoteWorker(process.address)
        try:
            remote = LLMEngine(EngineConfig(model=str(random_model)), worker=worker).generate(prompts, params, specs)
        finally:
            worker.close()
    assert [c.token_ids for c in remote] == [c.token_ids for c in local]
    for schema, completion in zip(SCHEMAS, remote[:6]):
        jsonschema.validate(json.loads(text_of(tokenizer, completion)), schema)


# -- through the tokenizer: text in, constrained text out ---------------------------------------------------------

@pytest.fixture(scope="module")
def textgen(random_model, engine_server):
    from tessera.tokenizer.v1 import tokenizer_pb2_grpc

    with ServerProcess("tokenizer", "--model", str(random_model), "--engine", engine_server.address) as front, \
            grpc.insecure_channel(front.address) as channel:
        yield tokenizer_pb2_grpc.TextGenerationStub(channel)


def text_request(structured_output, *, text="", messages=(), stop=(), n=1, seed=None, temperature=0.0):
    from tessera.tokenizer.v1 import tokenizer_pb2

    return tokenizer_pb2.GenerateRequest(
        text=text, messages=list(messages), n=n, structured_output=structured_output,
        sampling=engine_pb2.SamplingParams(temperature=temperature, seed=seed),
        stopping=engine_pb2.StoppingParams(max_tokens=200, stop=list(stop)))


def test_text_generation_passes_the_constraint_through_with_n_samples(textgen):
    schema = SCHEMAS[1]
    responses = list(textgen.Generate(text_request(engine_pb2.StructuredOutput(json_schema=json.dumps(schema)),
                                                   text="config = ", n=3, seed=5, temperature=1.0)))
    texts = ["".join(r.text for r in responses if r.index == i) for i in range(3)]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1  # three samples, three matchers
    assert {r.finish_reason for r in responses if r.finish_reason} == {engine_pb2.FINISH_REASON_STOP}


def test_a_chat_reply_as_json_to_a_schema(textgen):
    from tessera.tokenizer.v1 import tokenizer_pb2

    schema = SCHEMAS[4]
    messages = [tokenizer_pb2.ChatMessage(role="user", content="Who is logged in? Answer in JSON.")]
    responses = list(textgen.Generate(text_request(engine_pb2.StructuredOutput(json_schema=json.dumps(schema)),
                                                   messages=messages)))
    jsonschema.validate(json.loads("".join(r.text for r in responses)), schema)


def test_stop_strings_still_cut_a_constrained_output(textgen):
    choices = ("alpha beta gamma", "delta beta epsilon")
    responses = list(textgen.Generate(text_request(engine_pb2.StructuredOutput(
        choice=engine_pb2.Choice(choices=choices)), text="x", stop=[" beta"])))
    text, last = "".join(r.text for r in responses), responses[-1]
    assert text in ("alpha", "delta") and last.matched_stop == " beta"
    assert last.finish_reason == engine_pb2.FINISH_REASON_STOP


def test_a_caller_giving_up_does_not_spoil_the_cached_compilation(random_model):
    import asyncio

    engine = LLMEngine(EngineConfig(model=str(random_model), kv_cache_memory=8 << 20))
    engine.grammars.compile(StructuredOutput(regex="a"))  # the vocabulary
    for blocker in ("first", "second"):  # both compile threads busy: the next compilation waits in the queue
        engine.grammars.submit(StructuredOutput(json_schema=json.dumps({"enum": [f"{blocker} {i}" for i in range(6000)]})))
    spec = StructuredOutput(json_schema=json.dumps({"enum": [f"value number {i}" for i in range(300)]}))

    async def give_up():
        task = asyncio.ensure_future(engine.grammars.compile_async(spec))
        await asyncio.sleep(0.01)
        task.cancel()  # as a client cancelling its call while the constraint compiles
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(give_up())
    assert engine.grammars.compile(spec).spec == spec  # the same compilation finished, for the next caller
