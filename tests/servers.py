"""Real tessera servers as subprocesses on loopback, for integration tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, *args, world: int = 2, timeout: float = 120.0) -> dict:
    """`target(rank, *args, port, out)` in `world` spawned processes that meet at a free loopback port (torch
    distributed); each puts (rank, result) on `out`. Returns {rank: result}."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out, port = context.Queue(), free_port()
    ranks = [context.Process(target=target, args=(r, *args, port, out)) for r in range(world)]
    for process in ranks:
        process.start()
    results = dict(out.get(timeout=timeout) for _ in ranks)
    for process in ranks:
        process.join(30)
    return results


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None, options=None) -> grpc.Channel:
    """Plaintext, or TLS with `credentials`."""
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def wait_serving(address: str, timeout: float = 60.0, process: subprocess.Popen | None = None,
                 service: str = "", credentials: grpc.ChannelCredentials | None = None, options=None) -> None:
    """Until `address` reports `service` (default: the server as a whole) SERVING; over TLS with `credentials`."""
    deadline = time.monotonic() + timeout
    with open_channel(address, credentials, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server at {address} exited with {process.returncode}")
            try:
                request = health_pb2.HealthCheckRequest(service=service)
                if stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} did not become SERVING in {timeout} s")


class ServerProcess:
    """`tessera <role> ... --port P` as a child process, SERVING on entry, SIGTERMed on exit. A TLS server
    needs `credentials` (and `options`, e.g. grpc.ssl_target_name_override) for the health checks."""

    def __init__(self, role: str, *args: str, port: int | None = None, env: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None, options=None):
        self.credentials, self.options = credentials, options
        self.port = port or free_port()
        self.env = env or {}
        self.address = f"127.0.0.1:{self.port}"
        if role in ("engine", "worker") and "--dtype" not in args:
            # The CLI's --dtype auto serves in bf16 on CPUs that have it; the tests compare tokens with fp32
            # in-process engines and transformers, on every CPU (test_device.py tests auto itself).
            args = (*args, "--dtype", "float32")
        self.command = [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", role, *args,
                        "--host", "127.0.0.1", "--port", str(self.port)]
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.process = subprocess.Popen(self.command, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        wait_serving(self.address, process=self.process, credentials=self.credentials, options=self.options)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
