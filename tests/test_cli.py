"""The `tessera` command as a user runs it: `up`, `generate`, `health`, Ctrl-C."""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port, wait_serving
from tessera.cli import parse_bytes
from tiny_checkpoints import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "tessera-demo"


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory) -> Path:
    """A tiny random model that speaks the demo tokenizer's vocabulary."""
    path = tmp_path_factory.mktemp("tiny-demo-tokenizer")
    vocab = json.loads((DEMO / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    make_tiny_checkpoint(path, "llama", vocab_size=size, max_position_embeddings=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, path / name)
    return path


def tessera(*args: str) -> list[str]:
    return [sys.executable, "-m", "tessera.cli", *args]


def free_port_pair() -> int:
    """A free port whose next one is free too: `tessera up --port P` puts its engine on P + 1."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def test_up_serves_generate_streams_and_ctrl_c_stops_everything(model_with_tokenizer):
    port = free_port_pair()
    up = subprocess.Popen(tessera("--log-level", "WARNING", "up", "--model", str(model_with_tokenizer),
                                  "--port", str(port)), stdout=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=120, process=up)
        done = subprocess.run(tessera("generate", "def add(a, b):", "--address", f"127.0.0.1:{port}",
                                      "--max-tokens", "8"), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("def add(a, b):") and len(done.stdout) > len("def add(a, b):\n")
        health = subprocess.run(tessera("health", "--address", f"127.0.0.1:{port + 1}"), capture_output=True,
                                text=True, timeout=30)
        assert health.returncode == 0 and "SERVING" in health.stdout  # the engine, on the next port
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
    assert code == 0
    assert orphans(port) == []  # no engine or tokenizer left behind


def orphans(port: int) -> list[str]:
    pattern = rf"tessera\.cli .*--port ({port}|{port + 1})( |$)"
    return subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()


def test_orphan_check_sees_a_running_child(model_with_tokenizer):
    port = free_port()
    child = subprocess.Popen([*tessera("engine", "--model", str(model_with_tokenizer), "--port", str(port + 1))])
    try:
        assert orphans(port) == [str(child.pid)]
    finally:
        child.kill()
        child.wait()


def test_health_fails_when_nothing_listens():
    done = subprocess.run(tessera("health", "--address", f"127.0.0.1:{free_port()}"), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_generate_without_waiting_reports_an_unreachable_server_clearly():
    done = subprocess.run(tessera("generate", "x", "--address", f"127.0.0.1:{free_port()}", "--wait", "0"),
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_generate_started_before_the_services_waits_for_them(model_with_tokenizer):
    """The newcomer's race: `make up` in one terminal, `tessera generate` at once in another."""
    port = free_port_pair()
    generate = subprocess.Popen(tessera("generate", "def add(a, b):", "--address", f"127.0.0.1:{port}",
                                        "--max-tokens", "8", "--wait", "120"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    up = None
    try:
        first = generate.stderr.readline()  # it found nothing listening, said so, and waits
        assert f"127.0.0.1:{port} is not serving yet (nothing answers there); waiting up to 120 s" in first
        assert generate.poll() is None
        up = subprocess.Popen(tessera("--log-level", "WARNING", "up", "--model", str(model_with_tokenizer),
                                      "--port", str(port)), stdout=subprocess.DEVNULL)
        out, rest = generate.communicate(timeout=120)
    finally:
        if generate.poll() is None:
            generate.kill()
            generate.wait()
        if up is not None:
            up.send_signal(signal.SIGINT)
            up.wait(60)
    assert generate.returncode == 0, first + rest
    assert out.startswith("def add(a, b):") and len(out) > len("def add(a, b):\n")
    assert "not serving yet" not in rest  # said once


def test_generate_gives_up_after_its_wait_with_a_plain_message():
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = subprocess.run(tessera("generate", "x", "--address", address, "--wait", "1"), capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert f"{address} did not become ready in 1 s (nothing answers there)" in done.stderr
    assert "Is `tessera up` (or `make up`) running" in done.stderr and "--wait waits longer" in done.stderr
    assert "Traceback" not in done.stderr and "Connection refused" not in done.stderr
    assert done.stderr.count("not serving yet") == 1
    assert time.monotonic() - start < 20


def test_generate_waits_for_an_engine_behind_a_serving_tokenizer(model_with_tokenizer):
    """A tokenizer that is up but has no engine yet is NOT_SERVING for TextGeneration: generate waits on that too."""
    port, no_engine = free_port(), free_port()
    tokenizer = subprocess.Popen(tessera("--log-level", "WARNING", "tokenizer", "--model", str(model_with_tokenizer),
                                         "--engine", f"127.0.0.1:{no_engine}", "--host", "127.0.0.1",
                                         "--port", str(port)))
    try:
        wait_serving(f"127.0.0.1:{port}", service="tessera.tokenizer.v1.Tokenizer", process=tokenizer)
        done = subprocess.run(tessera("generate", "x", "--address", f"127.0.0.1:{port}", "--wait", "1"),
                              capture_output=True, text=True, timeout=30, check=False)
    finally:
        tokenizer.send_signal(signal.SIGTERM)
        tokenizer.wait(60)
    assert done.returncode == 1
    assert "did not become ready in 1 s (it answers but reports NOT_SERVING" in done.stderr


def test_byte_sizes():
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1e9") == 10**9
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")


def test_a_remote_tpu_worker_is_refused_clearly(monkeypatch):
    from tessera.worker import device

    monkeypatch.setattr(device, "resolve_device", lambda name=None: __import__("torch").device("xla"))
    from tessera import cli

    with pytest.raises(SystemExit, match="use `tessera engine --device tpu`"):
        cli.main(["worker", "--device", "tpu", "--model", str(DEMO)])


PROBE = """
import os, sys
from tessera import cli
cli.COMMANDS[sys.argv[1]] = lambda args: print(os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("role, env, expected", [("engine", {}, "30000 False"), ("worker", {}, "30000 False"),
                                                 ("up", {}, "30000 False"),
                                                 ("engine", {"GOMP_SPINCOUNT": "5"}, "5 False"),
                                                 ("health", {}, "None False")])
def test_the_serving_roles_shorten_openmps_spin_before_torch_loads_it(role, env, expected, monkeypatch):
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: the CLI sets it (unless set) before any torch
    import, for the roles that compute (and `up`, whose children inherit it); clients leave it alone."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = subprocess.run([sys.executable, "-c", PROBE, role], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == expected
