"""Bytes that do not parse as the request message are INVALID_ARGUMENT on every RPC of every server, never UNKNOWN.

Sent raw (a channel method without a serializer), as a careless or hostile client would: a truncated tag,
invalid UTF-8 in a string field, an over-long varint. The server stays SERVING and answers the next good call.
"""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from servers import ServerProcess
from tessera.engine.v1 import engine_pb2
from tessera.tokenizer.v1 import tokenizer_pb2
from tessera.worker.v1 import worker_pb2
from tiny_checkpoints import preset_checkpoint

GARBAGE = {
    "truncated": b"\x0a\x05ab",  # field 1, length 5, only 2 bytes follow
    "invalid utf-8": b"\x0a\x02\xff\xfe",  # field 1 is a string in every request that has one
    "over-long varint": b"\x10" + b"\xff" * 11,  # field 2 as a varint longer than 64 bits
}


def rpcs(descriptor_module, service: str):
    """(path, client streaming, server streaming, field 1 is a string) of every method of the service."""
    string = 9  # FieldDescriptor.TYPE_STRING
    return [(f"/{m.containing_service.full_name}/{m.name}", m.client_streaming, m.server_streaming,
             1 in m.input_type.fields_by_number and m.input_type.fields_by_number[1].type == string)
            for m in descriptor_module.DESCRIPTOR.services_by_name[service].methods]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from tiny_tokenizers import tokenizer_dirs

    model = preset_checkpoint(tmp_path_factory, "llama")
    with ServerProcess("engine", "--model", str(model), "--kv-cache-memory", "4MiB") as engine, \
            ServerProcess("worker", "--model", str(model), "--kv-cache-memory", "4MiB") as worker, \
            ServerProcess("tokenizer", "--model", str(tokenizer_dirs()["llama3"]), "--engine",
                          engine.address) as tokenizer:
        yield {"engine": (engine.address, rpcs(engine_pb2, "Engine")),
               "worker": (worker.address, rpcs(worker_pb2, "Worker")),
               "tokenizer": (tokenizer.address, rpcs(tokenizer_pb2, "Tokenizer") + rpcs(tokenizer_pb2, "TextGeneration"))}


# Every server has these too: health (Check, List, Watch) and reflection.
COMMON = rpcs(health_pb2, "Health") + rpcs(reflection_pb2, "ServerReflection")


def call_raw(channel, path, client_streaming, server_streaming, payload: bytes):
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[(client_streaming, server_streaming)]
    method = kind(path)  # no serializers: bytes go out as they are, and come back as bytes
    request = iter([payload]) if client_streaming else payload
    result = method(request, timeout=10)
    return list(result) if server_streaming else result


@pytest.mark.parametrize("role", ["engine", "worker", "tokenizer"])
@pytest.mark.parametrize("kind", list(GARBAGE))
def test_undecodable_requests_are_invalid_argument(servers, role, kind):
    address, methods = servers[role]
    with grpc.insecure_channel(address) as channel:
        for path, client_streaming, server_streaming, string_field in methods + COMMON:
            if kind == "invalid utf-8" and not string_field:
                continue  # an unknown field: its bytes are kept, not parsed (and that is right)
            with pytest.raises(grpc.RpcError) as error:
                call_raw(channel, path, client_streaming, server_streaming, GARBAGE[kind])
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error.value.details())
            assert error.value.details().startswith("request: not a valid "), (path, error.value.details())
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
