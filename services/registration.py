"""Servicers registered from their service descriptors, with request decoding that cannot fail a call as UNKNOWN.

grpc's generated `add_*Servicer_to_server` decodes each request with `FromString`; bytes that do not parse
(invalid UTF-8 in a string field, an over-long varint, a truncated message) raise inside grpc, and the client
gets `UNKNOWN: Unexpected <class 'DecodeError'>`. Here the decoder hands such bytes on as an `Undecodable`,
and the handler answers INVALID_ARGUMENT naming the message type and the parser's reason before any servicer
code runs. The handlers are otherwise what grpc would build: the servicer's own methods, by name.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse as `type_name`."""

    type_name: str
    reason: str

    @property
    def message(self) -> str:
        return f"request: not a valid {self.type_name} message ({self.reason})"


def add_servicer(server: grpc.aio.Server, servicer, service: ServiceDescriptor) -> str:
    """Registers every method of `service` on `server`, served by `servicer`; returns the service's full name."""
    handlers = {method.name: _handler(getattr(servicer, method.name), method) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    return service.full_name


def _handler(behavior, method: MethodDescriptor) -> grpc.RpcMethodHandler:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)

    def decode(data: bytes):
        try:
            return request_class.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as error:
            return Undecodable(method.input_type.full_name, str(error) or type(error).__name__)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(method.client_streaming, method.server_streaming)]
    guarded = _guard_stream(behavior) if method.client_streaming else _guard(behavior)
    return make(guarded, request_deserializer=decode, response_serializer=response_class.SerializeToString)


def _guard(behavior):
    """A unary-request behavior that refuses an Undecodable request."""
    if inspect.isasyncgenfunction(behavior):
        async def streaming(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for response in behavior(request, context):
                yield response

        return streaming

    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return unary


def _guard_stream(behavior):
    """A streaming-request behavior whose request iterator ends the call at the first Undecodable message."""

    async def checked(requests, context):
        async for request in requests:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            yield request

    if inspect.isasyncgenfunction(behavior):
        async def streaming(requests, context):
            async for response in behavior(checked(requests, context), context):
                yield response

        return streaming

    async def unary(requests, context):
        return await behavior(checked(requests, context), context)

    return unary
