"""A client in a second language: Node.js (clients/node/generate.js) and `buf curl` against real servers.

generate.js loads the .proto files at run time with @grpc/proto-loader; `buf curl` gets no .proto files at all
and learns the API through server reflection. Both must stream the same greedy text as the Python client.
Needs node and clients/node/node_modules (`npm ci --prefix clients/node`); skipped when either is missing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from servers import ServerProcess
from tessera.engine.v1 import engine_pb2
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tiny_checkpoints import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NODE_CLIENT = ROOT / "clients" / "node"
NODE_MODULES = NODE_CLIENT / "node_modules"
BUF = NODE_MODULES / ".bin" / "buf"
DEMO_TOKENIZER = ROOT / "models" / "tessera-demo"
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 12

NODE = shutil.which("node")
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (Debian: apt-get install nodejs npm)"),
    pytest.mark.skipif(not NODE_MODULES.is_dir(),
                       reason="clients/node/node_modules is missing: run `npm ci --prefix clients/node`"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama whose vocabulary is the demo tokenizer's, so text round-trips."""
    from tokenizers import Tokenizer

    path = tmp_path_factory.mktemp("demo_vocab_llama")
    vocab_size = Tokenizer.from_file(str(DEMO_TOKENIZER / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    make_tiny_checkpoint(path, "llama", vocab_size=vocab_size, max_position_embeddings=128)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_TOKENIZER / name, path / name)
    return path


@pytest.fixture(scope="module")
def tokenizer_server(model_dir):
    with ServerProcess("engine", "--model", str(model_dir), "--kv-cache-memory", "8MiB") as engine, \
            ServerProcess("tokenizer", "--model", str(model_dir), "--engine", engine.address) as tokenizer:
        yield tokenizer


@pytest.fixture(scope="module")
def python_greedy(tokenizer_server):
    """What the Python client streams for the same greedy request: (text, finish_reason name, usage)."""
    request = tokenizer_pb2.GenerateRequest(
        text=PROMPT, sampling=engine_pb2.SamplingParams(temperature=0.0),
        stopping=engine_pb2.StoppingParams(max_tokens=MAX_TOKENS),
    )
    with grpc.insecure_channel(tokenizer_server.address) as channel:
        responses = list(tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(request, timeout=60))
    last = responses[-1]
    text = "".join(r.text for r in responses)
    assert text and last.usage.completion_tokens >= 1
    return text, engine_pb2.FinishReason.Name(last.finish_reason), last.usage


def run(command, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_node_client_streams_the_same_greedy_text(tokenizer_server, python_greedy):
    text, finish_reason, usage = python_greedy
    result = run([NODE, NODE_CLIENT / "generate.js", tokenizer_server.address, PROMPT, "--max-tokens", MAX_TOKENS])
    assert result.returncode == 0, result.stderr
    streamed, summary_line, rest = result.stdout.rsplit("\n", 2)  # text deltas, "\n", one JSON line, "\n"
    assert rest == ""
    assert streamed == text
    summary = json.loads(summary_line)
    assert summary["finish_reason"] == finish_reason
    assert summary["usage"] == {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                "cached_tokens": usage.cached_tokens}


def test_node_client_exits_non_zero_with_the_grpc_status(tokenizer_server):
    result = run([NODE, NODE_CLIENT / "generate.js", tokenizer_server.address, PROMPT, "--max-tokens", 100_000])
    assert result.returncode == 1
    assert "INVALID_ARGUMENT (3): stopping.max_tokens" in result.stderr


def test_buf_curl_through_server_reflection(tokenizer_server, python_greedy, tmp_path):
    text, finish_reason, usage = python_greedy
    body = {"text": PROMPT, "sampling": {"temperature": 0}, "stopping": {"maxTokens": MAX_TOKENS}}
    url = f"http://{tokenizer_server.address}/tessera.tokenizer.v1.TextGeneration/Generate"
    # cwd is an empty directory: no buf.yaml or .proto files for buf to find, only reflection.
    result = run([BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", json.dumps(body), url],
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    decoder, out, messages, at = json.JSONDecoder(), result.stdout, [], 0
    while out[at:].strip():  # one pretty-printed JSON object per streamed response
        message, at = decoder.raw_decode(out, at + len(out[at:]) - len(out[at:].lstrip()))
        messages.append(message)
    assert len(messages) > 1  # streamed, not one response
    assert "".join(m.get("text", "") for m in messages) == text
    assert messages[-1]["finishReason"] == finish_reason
    assert int(messages[-1]["usage"]["completionTokens"]) == usage.completion_tokens
