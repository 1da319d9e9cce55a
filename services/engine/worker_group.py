"""A tensor-parallel worker group on this machine: N `tessera worker` processes that the engine drives through
rank 0.

Each rank gets its own device (CUDA device i) or its own share of the CPU cores (pinned, with as many OpenMP
threads), and they meet through torch.distributed's env:// rendezvous on a free loopback port. The engine talks
to rank 0 only, over gRPC (a RemoteWorker); rank 0 broadcasts each plan to the others and returns the one result.
A rank that exits (killed, crashed, or out because the group broke) fails the step in progress with UNAVAILABLE
naming it; the other ranks are stopped and all N start again, and once rank 0 answers, the next step dials it.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tessera.engine.engine import EngineConfig
from tessera.engine.remote_worker import RemoteWorker, WorkerUnavailable
from tessera.step import StepPlan, StepResult

log = logging.getLogger("tessera.engine")

RESTART_DELAY_S = 1.0  # between a rank's exit and the group's restart (and the least time between restarts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_shares(size: int) -> list[set[int]]:
    """The cores this process may use, dealt out to `size` ranks (each at least one)."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(len(cores) // size, 1)
    return [set(cores[(r * per_rank) % len(cores):][:per_rank]) for r in range(size)]


class LocalWorkerGroup:
    def __init__(self, config: EngineConfig, step_timeout: float = 120.0, collective_timeout: float = 60.0):
        self.config = config
        self.size = config.tensor_parallel_size
        self.collective_timeout = collective_timeout
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []
        self.exits: dict[int, int] = {}  # rank -> exit code of the group's last failure
        self._lock = threading.Lock()
        self._closed = False
        self._start()
        try:
            self.remote = RemoteWorker(self.address, step_timeout=step_timeout)
        except BaseException:
            self.close()
            raise
        for name in ("model_config", "num_blocks", "block_size", "device", "attention_backend"):
            setattr(self, name, getattr(self.remote, name))
        self.tensor_parallel_size = self.size
        threading.Thread(target=self._supervise, name="tessera-worker-group", daemon=True).start()

    def execute(self, plan: StepPlan) -> StepResult:
        try:
            return self.remote.execute(plan)
        except WorkerUnavailable as error:
            deadline = time.monotonic() + 2.0  # rank 0 saw the collective fail; the rank's exit shows in a moment
            while not self.exits and time.monotonic() < deadline:
                time.sleep(0.05)
            ranks = ", ".join(f"rank {r} exited with {describe_exit(code)}" for r, code in sorted(self.exits.items()))
            raise WorkerUnavailable(self.address, f"tensor-parallel group of {self.size}: "
                                                  f"{ranks or 'no rank exited'}; {error}") from None

    def healthy(self) -> bool:
        """Every rank running and rank 0 SERVING (NOT_SERVING while the group restarts)."""
        return not self.exits and all(p.poll() is None for p in self.processes) and self.remote.healthy()

    def close(self) -> None:
        self._closed = True
        self._stop_all()
        if hasattr(self, "remote"):
            self.remote.close()

    # -- processes ----------------------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        c = self.config
        command = [sys.executable, "-m", "tessera.cli", "--log-level", logging.getLevelName(log.getEffectiveLevel()),
                   "worker", "--model", c.model, "--block-size", str(c.block_size),
                   "--kv-cache-memory", str(c.kv_cache_memory), "--cpu-matmul", c.cpu_matmul,
                   "--tensor-parallel-size", str(self.size), "--collective-timeout", str(self.collective_timeout),
                   "--host", "127.0.0.1", "--port", str(self.port)]
        if c.dtype:
            command += ["--dtype", c.dtype]
        if c.device:
            command += ["--device", c.device]
        if c.quantization:
            command += ["--quantization", c.quantization]
        if c.kv_cache_dtype != "auto":
            command += ["--kv-cache-dtype", c.kv_cache_dtype]
        return command

    def _start(self) -> None:
        master_port = free_port()
        shares = cpu_shares(self.size)
        cuda = (self.config.device or "").startswith("cuda")
        self.processes = []
        for rank in range(self.size):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.size),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "PYTHONUNBUFFERED": "1"}
            if cuda:
                env["CUDA_VISIBLE_DEVICES"] = str(rank)
            else:  # the worker pins itself to these (cli.py), before any OpenMP thread starts
                env["OMP_NUM_THREADS"] = str(len(shares[rank]))
                env["TESSERA_CPUS"] = ",".join(map(str, sorted(shares[rank])))
            # A session of its own: the engine's Ctrl-C reaches the engine, which stops the group in order.
            self.processes.append(subprocess.Popen(self._command(), env=env, start_new_session=True))
        log.info("tensor-parallel group of %d started (pids %s)", self.size, ", ".join(str(p.pid) for p in
                                                                                      self.processes))

    def _stop_all(self) -> None:
        """Rank 0 first: it tells the others to stop (they exit 0); then whatever is left."""
        with self._lock:
            for process in self.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    if process is self.processes[0]:
                        try:
                            process.wait(10)
                        except subprocess.TimeoutExpired:
                            pass
            for process in self.processes:
                try:
                    process.wait(3)  # a hung (or stopped) rank gets SIGKILL
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def _supervise(self) -> None:
        """Restarts the whole group when any rank exits: the others cannot go on without it."""
        while not self._closed:
            time.sleep(0.1)
            exited = {rank: p.returncode for rank, p in enumerate(self.processes) if p.poll() is not None}
            if not exited or self._closed:
                continue
            self.exits = exited
            log.error("tensor-parallel group: %s; restarting the group",
                      ", ".join(f"rank {r} exited with {describe_exit(code)}" for r, code in sorted(exited.items())))
            self._stop_all()
            time.sleep(RESTART_DELAY_S)
            if not self._closed:
                self._start()
                self.exits = {}


def describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
