"""What every tessera server has: health (overall and per service, Watch included), server reflection, a
Prometheus metrics port, errors that are never UNKNOWN, a bound on request size, and a graceful drain on SIGTERM
(health NOT_SERVING and new calls UNAVAILABLE while the port stays open for in-flight calls and health checks).

TLS: a server given a certificate and key (ServerTls) serves TLS, and with a client CA it requires and verifies
client certificates (mTLS). The files are read again whenever one of them changes (or on SIGHUP), so a rotated
certificate is used for the next new connection while the connections and streams already open carry on.
Clients of other tessera servers take a ClientTls: a CA to verify the server by, and a certificate of their own
for mTLS.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import ipaddress
import logging
import os
import signal
import ssl
import threading
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tessera.limits import MAX_REQUEST_BYTES, REQUEST_ID_MAX_CHARS, check_request_id
from tessera.metrics import REQUESTS
from tessera.registration import add_servicer
from tessera.sampling_params import InvalidParam

log = logging.getLogger("tessera.server")

MAX_MESSAGE_BYTES = 64 << 20  # long prompts and prompt logprobs make big messages
CHANNEL_OPTIONS = [  # clients of other tessera servers: replies (prompt logprobs) can be big
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# While draining every new call is refused except those to these services, and Abort (it only ends work that is
# already running, e.g. a tokenizer's sample that met its stop string).
DRAIN_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class HealthServicer(health.aio.HealthServicer):
    """grpc's health servicer plus List, which grpc.health.v1 has and grpc's servicer answers UNIMPLEMENTED."""

    async def List(self, request, context):
        # _server_status is grpc's own table: set() and the drain both write it.
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()})


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
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: a stream closed by the client mid-way
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


def request_id_from(context: grpc.aio.ServicerContext, given: str = "", max_chars: int = REQUEST_ID_MAX_CHARS) -> str:
    """The request's id, from the field or else the x-request-id metadata, checked (limits.check_request_id);
    empty when neither has one."""
    if given:
        return check_request_id(given, max_chars)
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return check_request_id(value, max_chars, "the x-request-id metadata")
    return ""


class DrainGate(grpc.aio.ServerInterceptor):
    """Counts the calls in flight and, once `draining`, refuses new ones with UNAVAILABLE, except health,
    reflection and Abort: the listener stays open for those while in-flight streams finish."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(DRAIN_EXEMPT) or method.endswith("/Abort"):
            return handler
        kind = ("stream" if handler.request_streaming else "unary") + "_" + \
               ("stream" if handler.response_streaming else "unary")
        return handler._replace(**{kind: self._gated(getattr(handler, kind))})

    def _enter(self) -> bool:
        if self.draining:
            return False
        self.in_flight += 1
        self.idle.clear()
        return True

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    def _gated(self, behavior):
        refusal = "the server is draining (shutting down): send new calls to another one"
        if inspect.isasyncgenfunction(behavior):
            async def stream(request, context):
                if not self._enter():
                    await context.abort(grpc.StatusCode.UNAVAILABLE, refusal)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self._leave()

            return stream

        async def call(request, context):
            if not self._enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, refusal)
            try:
                return await behavior(request, context)
            finally:
                self._leave()

        return call


def files_stamp(paths) -> tuple:
    """(mtime, size) of each file, or None for one that cannot be read now (mid-rotation)."""
    stamps = []
    for path in paths:
        try:
            info = os.stat(path)
            stamps.append((info.st_mtime_ns, info.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM files); with client_ca, clients must present a certificate
    that this CA signed (mTLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def stamp(self) -> tuple:
        """Changes when one of the files does (mtime or size): time to read them again."""
        return files_stamp(self.files)


@dataclass(frozen=True)
class ClientTls:
    """How a client verifies a server (the CA that signed its certificate) and, with cert and key, proves
    itself to one that requires client certificates (mTLS)."""

    ca: str
    cert: str | None = None
    key: str | None = None

    def stamp(self) -> tuple:
        """Changes when one of the files does: a long-lived channel should dial again with them."""
        return files_stamp(f for f in (self.ca, self.cert, self.key) if f)

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files now: a channel opened later reads them again."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key) if self.key else None,
            certificate_chain=_read(self.cert) if self.cert else None,
        )


class CertificateReloader:
    """The certificate-configuration fetcher of grpc.dynamic_ssl_server_credentials: gRPC calls it at the start
    of every new handshake (on its own threads); it re-reads the files when one has changed (mtime or size) or
    after force(), and otherwise returns None (keep the current one). A half-written pair (the key does not
    match the certificate, or a file cannot be parsed) keeps the old configuration until the files settle."""

    def __init__(self, tls: ServerTls):
        self.tls = tls
        self._lock = threading.Lock()
        self._forced = False
        try:  # a bad file at startup is an error, not a warning
            self._stamp = tls.stamp()
            self.initial = self._load()
        except (OSError, ssl.SSLError, ValueError) as error:
            raise ValueError(f"cannot load the TLS files {', '.join(tls.files)}: {error}") from error

    def _load(self) -> grpc.ServerCertificateConfiguration:
        ssl.create_default_context().load_cert_chain(self.tls.cert, self.tls.key)  # the key matches the cert
        client_ca = _read(self.tls.client_ca) if self.tls.client_ca else None
        if self.tls.client_ca:
            ssl.create_default_context(cadata=client_ca.decode("ascii"))  # it parses
        return grpc.ssl_server_certificate_configuration([(_read(self.tls.key), _read(self.tls.cert))], client_ca)

    def force(self) -> None:
        """Re-read the files at the next handshake even if they look unchanged (SIGHUP)."""
        self._forced = True

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                stamp = self.tls.stamp()
                if stamp == self._stamp and not self._forced:
                    return None
                config = self._load()
            except (OSError, ssl.SSLError, ValueError) as error:
                log.warning("TLS files changed but cannot be loaded (keeping the current certificate): %s", error)
                return None
            self._stamp, self._forced = stamp, False
            log.info("TLS certificate reloaded from %s", self.tls.cert)
            return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self, bool(self.tls.client_ca))


def is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Server:
    """A grpc.aio server with health, reflection and a drain; roles add their servicers before start()."""

    def __init__(self, port: int, host: str = "[::]", grace_seconds: float = 30.0,
                 max_request_bytes: int = MAX_REQUEST_BYTES, tls: ServerTls | None = None):
        # A bigger request is RESOURCE_EXHAUSTED ("Received message larger than max"), from gRPC itself.
        self.gate = DrainGate()
        self.grpc = grpc.aio.server(interceptors=[self.gate], options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", max_request_bytes),
        ])
        self.address = f"{host}:{port}"
        self.host = host
        self.reloader = CertificateReloader(tls) if tls is not None else None
        self.grace_seconds = grace_seconds
        self.health = HealthServicer()
        add_servicer(self.grpc, self.health, health_pb2.DESCRIPTOR.services_by_name["Health"])
        self.service_names: list[str] = []
        self.port: int | None = None
        self.metrics = None  # a MetricsServer, once serve_metrics is called

    def add_servicer(self, servicer, service: ServiceDescriptor) -> None:
        """Serves `service` with `servicer` (requests that do not parse: INVALID_ARGUMENT, see registration.py);
        it reports health and shows in reflection under its full name."""
        self.service_names.append(add_servicer(self.grpc, servicer, service))

    async def start(self) -> int:
        """Binds and starts serving; every service reports NOT_SERVING until set_serving(True)."""
        # Registered like every other service, so that bytes that do not parse are INVALID_ARGUMENT, not UNKNOWN.
        add_servicer(self.grpc, reflection.aio.ReflectionServicer(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]),
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
        if self.reloader is not None:
            self.port = self.grpc.add_secure_port(self.address, self.reloader.credentials())
            log.info("serving TLS with %s%s", self.reloader.tls.cert,
                     " (mTLS: client certificates required)" if self.reloader.tls.client_ca else "")
        else:
            self.port = self.grpc.add_insecure_port(self.address)
            if not is_loopback(self.host):
                log.warning("serving PLAINTEXT on %s, which is not a loopback address: anyone who can reach the port "
                            "can read and send traffic. Serve TLS with --tls-cert/--tls-key (and --tls-client-ca "
                            "for mTLS), or bind --host 127.0.0.1 behind a proxy that does TLS.", self.address)
        await self.set_serving(False)
        await self.grpc.start()
        return self.port

    def serve_metrics(self, port: int, stats=None) -> int:
        """Prometheus metrics on `port`, bound to this server's host, HTTPS with its TLS files when it has them;
        stats: a callable giving the engine's gauges at scrape time. Returns the bound port."""
        from tessera.metrics import register_stats
        from tessera.metrics_server import MetricsServer

        if stats is not None:
            register_stats(stats)
        self.metrics = MetricsServer(self.host, port, self.reloader.tls if self.reloader else None).start()
        return self.metrics.port

    def _reload_tls(self) -> None:
        self.reloader.force()
        if self.metrics is not None:
            self.metrics.force_reload()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def drain(self, cut_short: asyncio.Event | None = None) -> None:
        """Health says NOT_SERVING and new calls get UNAVAILABLE, while the listener stays open (health checks
        get their answer) and in-flight calls finish, for up to the grace period (or until `cut_short` is set);
        then the server stops, cancelling what is left."""
        self.gate.draining = True
        await self.health.enter_graceful_shutdown()
        waits = [asyncio.ensure_future(self.gate.idle.wait())]
        if cut_short is not None:
            waits.append(asyncio.ensure_future(cut_short.wait()))
        _, pending = await asyncio.wait(waits, timeout=self.grace_seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if self.gate.in_flight:
            log.warning("stopping with %d calls still in flight", self.gate.in_flight)
        # A moment for the calls that just ended to send their status; health watchers are cut off.
        await self.grpc.stop(0.5 if not self.gate.in_flight else 0)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.shutdown)
            self.metrics.server_close()

    async def serve_until_signalled(self) -> None:
        """Serves until SIGTERM or SIGINT, then drains; a second signal ends the drain at once."""
        loop = asyncio.get_running_loop()
        signals = 0
        stop, again = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            (stop if signals == 1 else again).set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if self.reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, self._reload_tls)  # re-read the TLS files
        await stop.wait()
        log.info("draining (up to %.0f s for in-flight calls; a second signal stops at once)", self.grace_seconds)
        await self.drain(again)
