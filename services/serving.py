"""What every tessera server has: health (overall and per service, Watch included), server reflection, a
Prometheus metrics port, errors that are never UNKNOWN, and a graceful drain on SIGTERM.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from tessera.metrics import REQUESTS
from tessera.registration import add_servicer
from tessera.sampling_params import InvalidParam

log = logging.getLogger("tessera.server")

MAX_MESSAGE_BYTES = 64 << 20  # long prompts and prompt logprobs make big messages
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class RpcError(Exception):
    """An error with the status a client should see."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, RpcError):
        return error.code, str(error)
    if isinstance(error, InvalidParam):
        return (grpc.StatusCode.OUT_OF_RANGE if error.out_of_range else grpc.StatusCode.INVALID_ARGUMENT), str(error)
    if isinstance(error, grpc.aio.AioRpcError):  # a call to another tessera server failed
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return grpc.StatusCode.UNAVAILABLE, f"upstream: {error.details()}"
        return code, error.details() or code.name
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def rpc_method(method):
    """Turns exceptions from a unary or server-streaming handler into a proper status, never UNKNOWN."""
    name = method.__name__

    @contextlib.asynccontextmanager
    async def outcome(context):
        """Counts the call by its status, and aborts with the right status on an exception."""
        try:
            yield
        except asyncio.CancelledError:
            REQUESTS.labels(name, "CANCELLED").inc()
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            code, message = status_of(error)
            REQUESTS.labels(name, code.name).inc()
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__qualname__, exc_info=error)
            await context.abort(code, message)
        else:
            REQUESTS.labels(name, "OK").inc()

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            async with outcome(context):
                async for response in method(self, request, context):
                    yield response

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        async with outcome(context):
            return await method(self, request, context)

    return unary


def request_id_from(context: grpc.aio.ServicerContext, given: str = "") -> str:
    if given:
        return given
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return value
    return ""


class Server:
    """A grpc.aio server with health, reflection and a drain; roles add their servicers before start()."""

    def __init__(self, port: int, host: str = "[::]", grace_seconds: float = 30.0):
        self.grpc = grpc.aio.server(options=CHANNEL_OPTIONS)
        self.address = f"{host}:{port}"
        self.grace_seconds = grace_seconds
        self.health = health.aio.HealthServicer()
        add_servicer(self.grpc, self.health, health_pb2.DESCRIPTOR.services_by_name["Health"])
        self.service_names: list[str] = []
        self.port: int | None = None

    def add_servicer(self, servicer, service: ServiceDescriptor) -> None:
        """Serves `service` with `servicer` (requests that do not parse: INVALID_ARGUMENT, see registration.py);
        it reports health and shows in reflection under its full name."""
        self.service_names.append(add_servicer(self.grpc, servicer, service))

    async def start(self) -> int:
        """Binds and starts serving; every service reports NOT_SERVING until set_serving(True)."""
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc
        )
        self.port = self.grpc.add_insecure_port(self.address)
        await self.set_serving(False)
        await self.grpc.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def drain(self) -> None:
        """Stops taking new calls, lets in-flight streams finish within the grace period, then stops."""
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.grace_seconds)

    async def serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("draining (up to %.0f s for in-flight streams)", self.grace_seconds)
        await self.drain()
