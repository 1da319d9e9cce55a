"""The `tessera` command as a user runs it: `up`, `generate`, `health`, Ctrl-C; and the deploy files' commands."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from servers import free_port, wait_serving
from tessera.cli import build_parser, parse_bytes
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


def test_up_serves_generate_streams_and_ctrl_c_stops_everything(model_with_tokenizer):
    port = free_port()
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


def test_generate_reports_an_unreachable_server_clearly():
    done = subprocess.run(tessera("generate", "x", "--address", f"127.0.0.1:{free_port()}"), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_byte_sizes():
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1e9") == 10**9
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")


def test_compose_and_dockerfile_commands_are_valid_tessera_invocations():
    """Every command the deploy files run parses with the real CLI, and every Dockerfile they name exists."""
    parser = build_parser()
    compose = (REPO / "compose.yaml").read_text()
    for dockerfile in re.findall(r"dockerfile:\s*([\w./-]+)", compose):
        assert (REPO / dockerfile).is_file(), dockerfile
    commands = [json.loads(c) for c in re.findall(r"command:\s*(\[.*\])", compose)]
    for path in (REPO / "docker").glob("Dockerfile.*"):
        text = path.read_text()
        commands += [json.loads(c) for c in re.findall(r"^CMD\s+(\[.*\])", text, re.MULTILINE)]
        commands += [json.loads(c)[1:] for c in re.findall(r'HEALTHCHECK .*CMD\s+(\[.*\])', text)]
    assert len(commands) >= 4
    for command in commands:
        args = parser.parse_args(command)
        assert args.command in {"engine", "tokenizer", "worker", "health"}, shlex.join(command)


def test_compose_runs_one_engine_per_profile_behind_the_name_the_tokenizer_dials():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    parser = build_parser()
    tokenizer = parser.parse_args(compose["tokenizer"]["command"])
    engines = {name: svc for name, svc in compose.items() if name.startswith("engine-")}
    assert sorted(svc["profiles"][0] for svc in engines.values()) == ["cpu", "cuda", "tpu"]
    for svc in engines.values():
        args = parser.parse_args(svc["command"])
        assert svc["networks"]["default"]["aliases"] == ["engine"]
        assert tokenizer.engine == [f"engine:{args.port}"] and args.device == svc["profiles"][0]
    assert "COMPOSE_PROFILES=cpu" in (REPO / ".env").read_text()  # plain `docker compose up` is the CPU one


def test_a_remote_tpu_worker_is_refused_clearly(monkeypatch):
    from tessera.worker import device

    monkeypatch.setattr(device, "resolve_device", lambda name=None: __import__("torch").device("xla"))
    from tessera import cli

    with pytest.raises(SystemExit, match="use `tessera engine --device tpu`"):
        cli.main(["worker", "--device", "tpu", "--model", str(DEMO)])
