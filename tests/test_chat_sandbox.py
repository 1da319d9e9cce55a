"""Chat templates sent by clients: refused unless the server allows them, and then rendered in a pool of
separate processes that are killed at their time or memory limit (services/tokenizer/chat_sandbox.py).

Real tokenizer servers on loopback (no engine: RenderChat needs none, and Generate renders before it forwards),
with small limits so that the file stays fast. Processes are watched through /proc.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers import ServerProcess, free_port, wait_serving
from tessera.engine.v1 import engine_pb2
from tessera.tokenizer.chat_sandbox import SandboxLimits
from tessera.tokenizer.chat_template import render_chat
from tessera.tokenizer.tokenizer import Tokenizer
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tiny_tokenizers import LLAMA3, MISTRAL

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"
TOKENIZER = "tessera.tokenizer.v1.Tokenizer"
LIMIT = 0.5  # seconds per render in the `sandboxed` server
SLACK = 5.0  # seconds a loaded 2-core machine may add to anything
CHAT = [tokenizer_pb2.ChatMessage(role="system", content="Be terse. «Ünïcödé» 日本語"),
        tokenizer_pb2.ChatMessage(role="user", content="Hi 😀"),
        tokenizer_pb2.ChatMessage(role="assistant", content="Hello!"),
        tokenizer_pb2.ChatMessage(role="user", content="Say \"</s>\" & bye\n")]
ENDLESS = "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}{% endfor %}" \
          "{% endfor %}{% endfor %}"
TOJSON = "{{ bos_token }}{% for m in messages %}{{ m | tojson(indent=2) }}{% for i in range(2) %}.{% endfor %}" \
         "{% endfor %}{% if add_generation_prompt %}>{% endif %}"


class TokenizerServer(ServerProcess):
    """`tessera tokenizer` on the demo tokenizer, with no engine: ready once its Tokenizer service is."""

    def __init__(self, *flags: str):
        super().__init__("tokenizer", "--model", str(DEMO), "--engine", f"127.0.0.1:{free_port()}", *flags)

    def start(self) -> TokenizerServer:
        self.process = subprocess.Popen(self.command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_serving(self.address, process=self.process, service=TOKENIZER)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid


@pytest.fixture(scope="module")
def refusing():
    with TokenizerServer() as server:
        yield server


@pytest.fixture(scope="module")
def sandboxed():
    with TokenizerServer("--allow-client-chat-template", "--chat-template-timeout", str(LIMIT),
                         "--chat-template-memory", "256MiB", "--chat-template-processes", "2") as server:
        yield server


@pytest.fixture
def patient():
    """One render process with a long time limit, so that only a cancel or a shutdown can stop a render."""
    with TokenizerServer("--allow-client-chat-template", "--chat-template-timeout", "60",
                         "--chat-template-processes", "1", "--grace", "1") as server:
        yield server


# -- helpers -------------------------------------------------------------------------------------------------------


def stubs(server):
    channel = grpc.insecure_channel(server.address)
    return (channel, tokenizer_pb2_grpc.TokenizerStub(channel), tokenizer_pb2_grpc.TextGenerationStub(channel),
            health_pb2_grpc.HealthStub(channel))


def render_request(template=None):
    return tokenizer_pb2.RenderChatRequest(messages=CHAT, chat_template=template)


def generate_request(template):
    return tokenizer_pb2.GenerateRequest(messages=CHAT, chat_template=template,
                                         stopping=engine_pb2.StoppingParams(max_tokens=4))


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and int(stat[1]) == pid and stat[0] != "Z":
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def sandbox_processes_of(pid: int) -> set[int]:
    """Live chat-sandbox processes started by server `pid`, wherever they were reparented to."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"tessera.tokenizer.chat_sandbox" in argv and str(pid).encode() in argv[-3:] and alive(int(entry)):
            found.add(int(entry))
    return found


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def until(predicate, seconds: float = SLACK):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def quick(call, bound: float = 1.0):
    """call() answers, within `bound` seconds."""
    start = time.monotonic()
    result = call()
    assert time.monotonic() - start < bound, f"took {time.monotonic() - start:.2f} s"
    return result


# -- tests ---------------------------------------------------------------------------------------------------------


def test_a_client_template_is_refused_unless_the_server_allows_it(refusing):
    channel, tok, textgen, _ = stubs(refusing)
    with channel:
        for call in (lambda: tok.RenderChat(render_request(LLAMA3)),
                     lambda: list(textgen.Generate(generate_request(LLAMA3)))):
            error = failure(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith("chat_template") and "--allow-client-chat-template" in error.details()
        model = Tokenizer(DEMO)  # the model's own template still renders
        assert tok.RenderChat(render_request()).prompt == model.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in CHAT])
    assert not children(refusing.pid)  # no sandbox processes when there is nothing to sandbox


@pytest.mark.parametrize("template", [LLAMA3, MISTRAL, TOJSON], ids=["llama3", "mistral", "tojson"])
def test_a_client_template_renders_as_it_does_in_process(sandboxed, template):
    model = Tokenizer(DEMO)
    chat = [{"role": m.role, "content": m.content} for m in CHAT]
    messages = CHAT[1:] if template is MISTRAL else CHAT  # Mistral's template refuses a system message
    expected = render_chat(template, chat[1:] if template is MISTRAL else chat, True, model.special_tokens_map)
    channel, tok, textgen, _ = stubs(sandboxed)
    with channel:
        response = tok.RenderChat(tokenizer_pb2.RenderChatRequest(messages=messages, chat_template=template))
        assert response.prompt == expected
        assert list(response.token_ids) == model.encode(expected, add_special_tokens=False)
        # Generate renders it too, then fails only for want of an engine.
        req = generate_request(template)
        req.ClearField("messages")
        req.messages.extend(messages)
        assert failure(lambda: list(textgen.Generate(req))).code() == grpc.StatusCode.UNAVAILABLE


def test_a_broken_client_template_fails_as_before(sandboxed):
    channel, tok, _, _ = stubs(sandboxed)
    with channel:
        for template in ("{% for m in messages %}{{ m.content }", "{{ messages[0].content + 1 }}",
                         "{{ raise_exception('no system messages') }}"):
            error = failure(lambda t=template: tok.RenderChat(render_request(t)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith("messages: the chat template failed")


def test_an_endless_template_is_killed_at_the_limit_while_the_server_answers(sandboxed):
    before = children(sandboxed.pid)
    assert len(before) == 2
    channel, tok, _, health = stubs(sandboxed)
    with channel:
        start = time.monotonic()
        hostile = tok.RenderChat.future(render_request(ENDLESS), timeout=60)
        time.sleep(0.1)
        quick(lambda: health.Check(health_pb2.HealthCheckRequest(service=TOKENIZER), timeout=5))
        assert quick(lambda: tok.Tokenize(tokenizer_pb2.TokenizeRequest(text="hello"), timeout=5)).token_ids
        error = hostile.exception()
        elapsed = time.monotonic() - start
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("chat_template") and f"{LIMIT:g} s render limit" in error.details()
    assert LIMIT <= elapsed < LIMIT + SLACK
    # The process that ran it was killed (not left burning a core) and a fresh one took its place.
    assert until(lambda: len(children(sandboxed.pid)) == 2 and children(sandboxed.pid) != before)
    (killed,) = before - children(sandboxed.pid)
    assert not alive(killed)


BOMBS = {  # template: what the message says
    "{% set s = 'x' * 300000000 %}{{ s }}": "repeated 300000000 times",
    "{{ messages | tojson(indent=100000000) }}": "indent 100000000",
    "{{ 'x' | center(300000000) }}": "256 MiB memory limit",  # no cheap check: the address-space limit stops it
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}": "",
    "{% for i in range(10000) %}{{ 'y' * 1000 }}{% endfor %}": "more than 1048576 bytes",  # --max-prompt-bytes
}


def test_memory_bombs_are_refused_and_the_server_does_not_grow(sandboxed):
    channel, tok, _, _ = stubs(sandboxed)
    with channel:
        tok.RenderChat(render_request(LLAMA3))  # warm
        rss = rss_bytes(sandboxed.pid)
        for template, says in BOMBS.items():
            error = failure(lambda t=template: tok.RenderChat(render_request(t), timeout=60))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            field = "messages" if "bytes" in says else "chat_template"
            assert error.details().startswith(field) and says in error.details(), error.details()
        growth = rss_bytes(sandboxed.pid) - rss
    assert growth < 100 << 20, f"the tokenizer grew by {growth >> 20} MiB"
    assert until(lambda: len(children(sandboxed.pid)) == 2)


def test_six_hostile_renders_at_once_do_not_stop_a_good_one(sandboxed):
    channel, tok, textgen, health = stubs(sandboxed)
    calls = [lambda: tok.RenderChat(render_request(ENDLESS), timeout=60),
             lambda: list(textgen.Generate(generate_request(ENDLESS), timeout=60))] * 3
    with channel, ThreadPoolExecutor(len(calls)) as pool:
        hostile = [pool.submit(failure, call) for call in calls]
        time.sleep(0.1)
        while not all(f.done() for f in hostile):  # health keeps answering all along
            assert quick(lambda: health.Check(health_pb2.HealthCheckRequest(service=TOKENIZER), timeout=5)).status \
                == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.1)
        for future in hostile:
            error = future.result(timeout=60)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "render limit" in error.details()
        good = tok.RenderChat(render_request(LLAMA3), timeout=30)
    assert good.prompt == render_chat(LLAMA3, [{"role": m.role, "content": m.content} for m in CHAT], True,
                                      Tokenizer(DEMO).special_tokens_map)


def test_a_client_that_gives_up_kills_its_render_or_drops_its_wait(patient):
    (child,) = children(patient.pid)
    channel, tok, _, _ = stubs(patient)
    with channel:
        error = failure(lambda: tok.RenderChat(render_request(ENDLESS), timeout=0.5))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert until(lambda: not alive(child) and len(children(patient.pid)) == 1)  # long before the 60 s limit
        (child,) = children(patient.pid)
        running = tok.RenderChat.future(render_request(ENDLESS), timeout=60)
        time.sleep(0.3)
        # The one process is busy: this one waits, and its deadline drops it from the queue.
        waiting = failure(lambda: tok.RenderChat(render_request(ENDLESS), timeout=0.5))
        assert waiting.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        running.cancel()
        assert until(lambda: not alive(child) and len(children(patient.pid)) == 1)
        # Nothing left in the queue (else this would wait the 60 s limit), and the fresh process works.
        assert tok.RenderChat(render_request(LLAMA3), timeout=30).prompt


def test_sigterm_during_a_render_exits_and_leaves_no_process_behind(patient):
    sandbox = children(patient.pid)
    assert len(sandbox) == 1
    channel, tok, _, _ = stubs(patient)
    with channel:
        hostile = tok.RenderChat.future(render_request(ENDLESS), timeout=60)
        time.sleep(0.3)
        start = time.monotonic()
        patient.process.send_signal(signal.SIGTERM)
        code = patient.process.wait(timeout=1 + SLACK + 5)  # --grace 1
        assert time.monotonic() - start < 1 + SLACK
        assert hostile.exception(timeout=10) is not None
    assert code == 0
    assert not any(alive(pid) for pid in sandbox)
    assert not sandbox_processes_of(patient.pid)


def test_a_sandbox_process_dies_with_a_killed_server():
    with TokenizerServer("--allow-client-chat-template") as server:
        sandbox = children(server.pid)
        assert len(sandbox) == 2
        server.process.kill()
        server.process.wait()
        assert until(lambda: not any(alive(pid) for pid in sandbox))  # PR_SET_PDEATHSIG


def test_the_flags_and_their_defaults():
    from tessera.cli import build_parser, chat_sandbox_from

    parse = build_parser().parse_args
    assert chat_sandbox_from(parse(["tokenizer"])) is None  # off unless allowed
    assert chat_sandbox_from(parse(["tokenizer", "--allow-client-chat-template"])) == SandboxLimits() == \
        SandboxLimits(seconds=1.0, memory_bytes=512 << 20, processes=2)
    assert chat_sandbox_from(parse(["tokenizer", "--allow-client-chat-template", "--chat-template-timeout", "0.25",
                                    "--chat-template-memory", "1GiB", "--chat-template-processes", "4"])) == \
        SandboxLimits(seconds=0.25, memory_bytes=1 << 30, processes=4)
    with pytest.raises(SystemExit):
        chat_sandbox_from(parse(["tokenizer", "--allow-client-chat-template", "--chat-template-processes", "0"]))
