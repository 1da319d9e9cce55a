"""The protobuf contract: stubs up to date, the names the architecture promises, buf-style conventions."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from tessera import step
from tessera.sampling_params import SamplingParams
from tessera.engine.v1 import engine_pb2
from tessera.tokenizer.v1 import tokenizer_pb2
from tessera.worker.v1 import worker_pb2

ROOT = Path(__file__).resolve().parent.parent
FILES = [engine_pb2.DESCRIPTOR, worker_pb2.DESCRIPTOR, tokenizer_pb2.DESCRIPTOR]


def test_stubs_are_up_to_date():
    grpc_version = pytest.importorskip("grpc_tools.grpc_version").VERSION
    stub = (ROOT / "services/engine/v1/engine_pb2_grpc.py").read_text()
    recorded = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", stub, re.MULTILINE).group(1)
    if recorded != grpc_version:
        pytest.skip(f"stubs come from grpcio-tools {recorded}, this is {grpc_version}: output differs by version")
    check = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def all_enums():
    def nested(message):
        yield from message.enum_types
        for inner in message.nested_types:
            yield from nested(inner)

    for file in FILES:
        yield from file.enum_types_by_name.values()
        for message in file.message_types_by_name.values():
            yield from nested(message)


def test_every_enum_starts_with_unspecified():
    enums = list(all_enums())
    assert enums
    for enum in enums:
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.full_name}: zero value {zero}"


RPCS = {
    "tessera.engine.v1.Engine": {"Generate": "server", "Abort": "unary", "GetModelInfo": "unary", "GetLoad": "unary"},
    "tessera.worker.v1.Worker": {"Execute": "bidi", "Describe": "unary"},
    "tessera.tokenizer.v1.Tokenizer": {
        "Tokenize": "unary", "Detokenize": "unary", "RenderChat": "unary", "GetTokenizerInfo": "unary",
    },
    "tessera.tokenizer.v1.TextGeneration": {"Generate": "server"},
}


def services():
    return {service.full_name: service for file in FILES for service in file.services_by_name.values()}


def test_services_and_rpcs():
    found = services()
    assert set(found) == set(RPCS)
    for name, rpcs in RPCS.items():
        methods = found[name].methods_by_name
        assert set(methods) == set(rpcs), name
        for rpc, kind in rpcs.items():
            method = methods[rpc]
            streams = (method.client_streaming, method.server_streaming)
            assert streams == {"unary": (False, False), "server": (False, True), "bidi": (True, True)}[kind], f"{name}/{rpc}"


def resolve(message, path: str) -> FieldDescriptor:
    """The field at a dotted path such as "sampling.temperature"."""
    *parents, last = path.split(".")
    for name in parents:
        message = message.fields_by_name[name].message_type
    return message.fields_by_name[last]


# Field paths the architecture names (outside clients rely on them).
NAMED_FIELDS = {
    engine_pb2.GenerateRequest: [
        "request_id", "prompt_token_ids", "sampling.temperature", "sampling.top_p", "sampling.top_k", "sampling.min_p",
        "sampling.seed", "stopping.max_tokens", "stopping.stop_token_ids", "stopping.ignore_eos", "stopping.stop",
        "output.logprobs",
    ],
    engine_pb2.GenerateResponse: [
        "token_ids", "logprobs", "finish_reason", "usage.prompt_tokens", "usage.completion_tokens", "usage.cached_tokens",
    ],
    engine_pb2.GetLoadResponse: ["num_running", "num_waiting", "kv_blocks_in_use", "kv_blocks_total"],
    tokenizer_pb2.GenerateRequest: [
        "text", "messages.role", "messages.content", "sampling.temperature", "stopping.stop", "stopping.max_tokens",
        "output.logprobs",
    ],
    tokenizer_pb2.GenerateResponse: ["text", "token_ids", "logprobs", "finish_reason", "usage.completion_tokens"],
}


@pytest.mark.parametrize("message", NAMED_FIELDS, ids=lambda m: m.DESCRIPTOR.full_name)
def test_named_fields_exist(message):
    for path in NAMED_FIELDS[message]:
        resolve(message.DESCRIPTOR, path)


def test_shared_messages_are_the_engines():
    # TextGeneration takes the very same sampling / stopping / output messages as Engine.
    for name in ("sampling", "stopping", "output"):
        assert (tokenizer_pb2.GenerateRequest.DESCRIPTOR.fields_by_name[name].message_type
                is engine_pb2.GenerateRequest.DESCRIPTOR.fields_by_name[name].message_type)
    assert engine_pb2.FinishReason.Value("FINISH_REASON_STOP") and engine_pb2.FinishReason.Value("FINISH_REASON_LENGTH")


def test_optional_fields_have_presence():
    # Unset differs from zero here: temperature 0 is greedy, unset is 1.0.
    for field in ("temperature", "top_p", "seed", "repetition_penalty"):
        params = engine_pb2.SamplingParams()
        assert not params.HasField(field)
        setattr(params, field, 0)
        assert params.HasField(field), field
    assert not engine_pb2.StoppingParams().HasField("max_tokens")
    assert not engine_pb2.OutputOptions().HasField("logprobs")
    greedy = engine_pb2.SamplingParams.FromString(engine_pb2.SamplingParams(temperature=0.0).SerializeToString())
    assert greedy.HasField("temperature") and greedy.temperature == 0.0


def test_worker_messages_mirror_step_py():
    # The worker's SamplingParams and NewRequest copy the Python dataclasses field for field (same names,
    # same order), so converting is a copy by name; None-able Python fields are proto3 optional.
    def names(message):
        return [f.name for f in message.DESCRIPTOR.fields]

    params = dataclasses.fields(SamplingParams)
    assert names(worker_pb2.SamplingParams) == [f.name for f in params]
    optional = {f.name for f in worker_pb2.SamplingParams.DESCRIPTOR.fields if f.has_presence}
    assert optional == {f.name for f in params if "None" in str(f.type)}
    assert names(worker_pb2.NewRequest) == [f.name for f in dataclasses.fields(step.NewRequest)]
    assert names(worker_pb2.StepPlan) == [f.name for f in dataclasses.fields(step.StepPlan)]
