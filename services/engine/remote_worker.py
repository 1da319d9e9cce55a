"""The engine's side of tessera.worker.v1.Worker: a WorkerClient that runs each step on a worker process.

Steps travel on one long-lived Execute stream, one plan out and one result back. The worker keeps request
state only as long as its stream, so a broken stream fails the step (the engine loop then aborts every
request and drops its prefix cache) and the next step opens a fresh stream on a fresh channel. A worker that
does not answer a step within `step_timeout` (hung, or a network partition) is treated the same way, so that no
stream waits on it forever.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.model_config import parse_dtype
from tessera.step import StepPlan, StepResult
from tessera.step import SERVICE_NAME, plan_to_proto, result_from_proto
from tessera.serving import CHANNEL_OPTIONS, ClientTls, RpcError
from tessera.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("tessera.engine")

CHANNEL = [
    *CHANNEL_OPTIONS,
    # Our own connection, so a new channel dials at once instead of inheriting a shared reconnect backoff;
    # and a short backoff, so a worker that is still starting is found soon after it listens.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class WorkerUnavailable(RpcError):
    """The worker cannot be reached, or its stream broke; clients of the engine see UNAVAILABLE."""

    def __init__(self, address: str, detail: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, f"worker at {address} is unavailable: {detail}")
        self.address = address


@dataclass
class RemoteModelConfig:
    """The part of ModelConfig the engine reads, from Describe: the engine host needs no checkpoint."""

    model_dir: Path
    architecture: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    dtype: torch.dtype
    kv_bytes_per_token: int

    @classmethod
    def from_describe(cls, info: worker_pb2.DescribeResponse) -> RemoteModelConfig:
        return cls(Path(info.model_path), info.architecture, info.vocab_size, info.max_model_len,
                   list(info.eos_token_ids), parse_dtype(info.dtype), info.kv_bytes_per_token)


class RemoteWorker:
    def __init__(self, address: str, connect_timeout: float = 300.0, step_timeout: float = 120.0,
                 tls: ClientTls | None = None):
        """Waits (up to connect_timeout: a worker may be loading a large model) until the worker is SERVING.
        With `tls`, the channel is TLS (mTLS when it has a certificate and key), its files read at each dial."""
        self.address = address
        self.tls = tls
        self.step_timeout = step_timeout
        self._channel = self._stub = None
        self._stream = None  # (request queue, the call, its responses) of the open Execute stream
        self._connect()
        try:
            self._wait_until_serving(connect_timeout)
            self.info = self._describe()
        except BaseException:
            self.close()
            raise
        self.model_config = RemoteModelConfig.from_describe(self.info)
        self.num_blocks = self.info.num_blocks
        self.block_size = self.info.block_size
        self.device = self.info.device
        self.attention_backend = self.info.attention_backend
        self.tensor_parallel_size = self.info.tensor_parallel_size or 1
        log.info("worker at %s: %s on %s, %d KV blocks x %d tokens", address, self.info.model_path, self.device,
                 self.num_blocks, self.block_size)

    def execute(self, plan: StepPlan) -> StepResult:
        if self._stream is None:
            self._open_stream()
        requests, _, responses = self._stream
        requests.put(worker_pb2.ExecuteRequest(plan=plan_to_proto(plan)))
        try:
            response = responses.get(timeout=self.step_timeout)
        except queue.Empty:
            self.close()
            raise WorkerUnavailable(self.address, f"no answer to a step in {self.step_timeout:g} s") from None
        if isinstance(response, grpc.RpcError):
            self.close()
            if response.code() is grpc.StatusCode.INTERNAL:  # the worker is up but failed the step: say so
                raise RpcError(response.code(), f"worker at {self.address} failed a step: {response.details()}")
            raise WorkerUnavailable(self.address, f"{response.code().name}: {response.details()}")
        if response is None:
            self.close()
            raise WorkerUnavailable(self.address, "it ended the stream")
        return result_from_proto(response.result)

    def healthy(self) -> bool:
        """Whether the worker answers SERVING now, and is the one the engine was sized for (on a channel of its
        own: the step channel may be gone). The engine's health follows it, so a load balancer stops sending
        requests that could only fail. Never raises."""
        probe = getattr(self, "_probe", None)
        try:
            if probe is None:
                probe = self._probe = (grpc.secure_channel(self.address, self.tls.credentials(), options=CHANNEL)
                                       if self.tls is not None else grpc.insecure_channel(self.address, options=CHANNEL))
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            if health_pb2_grpc.HealthStub(probe).Check(check, timeout=1).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                return False
            return _shape(worker_pb2_grpc.WorkerStub(probe).Describe(worker_pb2.DescribeRequest(), timeout=1)) == \
                _shape(self.info)
        except Exception:  # down, or the probe channel closed under us by close(): not healthy now
            return False

    def close(self) -> None:
        """Ends the stream and the channel; a later execute() would connect again."""
        if self._stream is not None:
            requests, call, _ = self._stream
            requests.put(None)  # ends the request iterator, so gRPC's sending thread exits
            call.cancel()  # and the reader thread with it
            self._stream = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if getattr(self, "_probe", None) is not None:
            self._probe.close()
            self._probe = None

    # -- connection -------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        if self.tls is not None:
            self._channel = grpc.secure_channel(self.address, self.tls.credentials(), options=CHANNEL)
        else:
            self._channel = grpc.insecure_channel(self.address, options=CHANNEL)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)

    def _wait_until_serving(self, timeout: float) -> None:
        health = health_pb2_grpc.HealthStub(self._channel)
        check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        deadline = time.monotonic() + timeout
        while True:
            try:
                remaining = max(deadline - time.monotonic(), 0.1)
                status = health.Check(check, timeout=remaining, wait_for_ready=True).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(self.address, f"not SERVING after {timeout:.0f} s (last: {last})")
            time.sleep(0.2)

    def _describe(self) -> worker_pb2.DescribeResponse:
        try:
            return self._stub.Describe(worker_pb2.DescribeRequest(), timeout=30)
        except grpc.RpcError as error:
            raise WorkerUnavailable(self.address, f"Describe: {error.code().name}: {error.details()}") from None

    def _open_stream(self) -> None:
        if self._channel is None:  # after a failure: dial again, and make sure it is the worker we sized for
            self._connect()
            try:
                info = self._describe()
            except WorkerUnavailable:  # still down: the next step dials, and checks, again (not this channel)
                self._channel.close()
                self._channel = None
                raise
            if _shape(info) != _shape(self.info):
                self.close()
                raise WorkerUnavailable(self.address, f"it came back as {_shape(info)}, not {_shape(self.info)} "
                                        "(model, vocab, KV blocks, block size); restart the engine")
        requests: queue.SimpleQueue = queue.SimpleQueue()
        call = self._stub.Execute(iter(requests.get, None))  # None ends the stream
        responses: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_read, args=(call, responses), name="tessera-worker-reader", daemon=True).start()
        self._stream = (requests, call, responses)


def _read(call, responses: queue.SimpleQueue) -> None:
    """Moves the stream's responses to a queue, which execute() can wait on with a deadline."""
    try:
        for response in call:
            responses.put(response)
        responses.put(None)  # the worker ended the stream
    except grpc.RpcError as error:
        responses.put(error)


def _shape(info: worker_pb2.DescribeResponse) -> tuple:
    """What the engine sized itself by: it cannot switch to a worker that differs in any of these."""
    return info.model_path, info.vocab_size, info.num_blocks, info.block_size
