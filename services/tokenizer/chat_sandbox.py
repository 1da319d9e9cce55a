"""Chat templates sent by clients render here: in a small pool of separate processes that can be killed.

A template is code. Jinja's sandbox stops it reaching Python's internals, but not looping for hours or asking
for gigabytes, and a thread that runs it cannot be stopped. So each render goes to a child process (this module
run as `python -m tessera.tokenizer.chat_sandbox`) whose address space is capped with RLIMIT_AS; the parent
awaits the answer on the event loop and, at the time limit, SIGKILLs the child and starts a fresh one. The pool
size bounds how many client renders run at once; more wait for a free child (their deadline applies). A request
cancelled or past its deadline kills the render it was running. close() kills every child, and a child whose
parent dies is killed by the kernel (PR_SET_PDEATHSIG), so no process outlives the server.

Wire format: the child says READY once it has started; then each request and each reply is a 4-byte big-endian
length and that much JSON. Never pickle: the child runs code from strangers, and the parent must not run anything
the child sends.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

from tessera.tokenizer.chat_template import ChatTemplateError, TemplateLimitError

log = logging.getLogger("tessera.tokenizer.sandbox")

READY = b"R"  # the child's first byte: imported and limited, ready for a request
STARTUP_SECONDS = 60.0  # a child that is not ready by then is broken (slow disk, loaded machine: be generous)


@dataclass(frozen=True)
class SandboxLimits:
    seconds: float = 1.0  # wall clock per render; HF templates take milliseconds
    memory_bytes: int = 512 << 20  # address space of each child (Python and Jinja take ~25 MiB of it)
    processes: int = 2  # client renders at once

    def __post_init__(self):
        if not self.seconds > 0 or self.processes < 1 or self.memory_bytes < 64 << 20:
            raise ValueError(f"sandbox limits: a positive time, at least one process and at least 64 MiB of memory "
                             f"are needed (got {self.seconds} s, {self.processes} processes, {self.memory_bytes} "
                             f"bytes)")


class SandboxUnavailable(Exception):
    """A child could not be started (the server's fault, not the template's)."""


class ChatSandbox:
    def __init__(self, limits: SandboxLimits = SandboxLimits()):
        self.limits = limits
        self.closed = False
        self._children = [_Child(limits.memory_bytes) for _ in range(limits.processes)]
        self._idle: asyncio.Queue[_Child] = asyncio.Queue()
        for child in self._children:
            self._idle.put_nowait(child)

    async def render(self, template: str, messages: list[dict], add_generation_prompt: bool,
                     special_tokens: dict[str, str], max_bytes: int) -> str:
        """The prompt text, as chat_template.render_client_chat gives it. ChatTemplateError for a broken template,
        TemplateLimitError when it passes a limit (time, memory, output size or one of the environment's)."""
        if self.closed:
            raise SandboxUnavailable("the chat template sandbox is shut down")
        request = {"template": template, "messages": messages, "add_generation_prompt": add_generation_prompt,
                   "special_tokens": special_tokens, "max_bytes": max_bytes}
        payload = await asyncio.to_thread(_frame, request)  # a big chat: milliseconds of JSON, off the loop
        child = await self._idle.get()
        child.busy = True
        try:
            return await self._render_on(child, payload, 6 * max_bytes + (64 << 10))  # ASCII JSON: <= 6x
        finally:
            child.busy = False
            self._idle.put_nowait(child)

    async def _render_on(self, child: _Child, payload: bytes, max_reply: int) -> str:
        if self.closed or child.process is None:
            raise SandboxUnavailable("the chat template sandbox is shut down")
        if child.process.poll() is not None:  # it died while idle (an OOM killer, say): not this template's fault
            await child.replace()
        try:
            await asyncio.wait_for(child.started(), STARTUP_SECONDS)
        except (asyncio.TimeoutError, EOFError, OSError) as error:
            await child.replace(not self.closed)
            raise SandboxUnavailable(f"the chat template sandbox did not start ({type(error).__name__})") from None
        try:
            reply = await asyncio.wait_for(child.exchange(payload, max_reply), self.limits.seconds)
        except asyncio.TimeoutError:
            await child.replace(not self.closed)
            raise TemplateLimitError(f"the template did not finish within the {self.limits.seconds:g} s render "
                                     f"limit") from None
        except EOFError:  # it died mid-render: the memory limit (a failed allocation can crash it) or a crash
            code = await child.replace(not self.closed)
            if self.closed:
                raise SandboxUnavailable("the chat template sandbox is shut down (the server is stopping)") from None
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            raise TemplateLimitError(f"the render stopped the sandbox process ({how}): it exceeded the "
                                     f"{_mib(self.limits.memory_bytes)} memory limit or crashed") from None
        except BaseException:  # cancelled (client gone, deadline passed, shutdown) or broken pipe: kill the render
            await child.replace(not self.closed)
            raise
        if reply.get("memory"):
            await child.replace(not self.closed)  # a fresh heap for the next one
            raise TemplateLimitError(f"the template exceeded the {_mib(self.limits.memory_bytes)} memory limit")
        if reply.get("limit"):
            raise TemplateLimitError(str(reply.get("error")), "messages" if reply.get("field") == "messages"
                                     else "chat_template")
        if "error" in reply:
            raise ChatTemplateError(str(reply["error"]))
        if not isinstance(reply.get("prompt"), str):
            await child.replace(not self.closed)
            raise SandboxUnavailable("the chat template sandbox sent a malformed reply")
        return reply["prompt"]

    def close(self) -> None:
        """Kills every child now (SIGKILL) and reaps it; a render still running sees it die (UNAVAILABLE), and
        renders still waiting get SandboxUnavailable."""
        self.closed = True
        for child in self._children:
            child.kill()


class _Child:
    """One sandbox process and its two pipes; the parent's ends are non-blocking, read and written through the
    running event loop (whichever it is: nothing here is bound to one loop)."""

    def __init__(self, memory_bytes: int):
        self.memory_bytes = memory_bytes
        self.process: subprocess.Popen | None = None
        self.busy = False  # a render owns it (and its pipes)
        self._spawn()

    def _spawn(self) -> None:
        # No preexec_fn (unsafe with threads, and it would stop vfork): the child limits itself first thing.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tessera.tokenizer.chat_sandbox", str(self.memory_bytes), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        self.to_child, self.from_child = self.process.stdin.fileno(), self.process.stdout.fileno()
        os.set_blocking(self.to_child, False)
        os.set_blocking(self.from_child, False)
        self.ready = False

    async def started(self) -> None:
        if not self.ready:
            if await _read(self.from_child, 1) != READY:
                raise EOFError
            self.ready = True

    async def exchange(self, payload: bytes, max_reply: int) -> dict:
        await _write(self.to_child, payload)
        (size,) = struct.unpack(">I", await _read(self.from_child, 4))
        if size > max_reply:
            raise EOFError  # our child never sends that much: treat it as broken
        return json.loads(await _read(self.from_child, size))

    async def replace(self, respawn: bool = True) -> int | None:
        """Kills this child (SIGKILL), reaps it without blocking the loop, and starts a fresh one."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        deadline = time.monotonic() + 5.0
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # dying takes a scheduler tick or two
        if process.poll() is None:
            process.wait()  # stuck in the kernel: rare; wait for it rather than leave a zombie
        self._close_pipes()
        log.info("chat template sandbox process %d stopped (exit %s)%s", process.pid, process.returncode,
                 "; starting a fresh one" if respawn else "")
        if respawn:
            self._spawn()
        return process.returncode

    def kill(self) -> None:
        """Kills and reaps it now. The pipes of a busy child stay open: its render reads EOF from them and
        closes them (closing a file descriptor that the event loop still watches would confuse the loop)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if not self.busy:
            self._close_pipes()

    def _close_pipes(self) -> None:
        self.process.stdin.close()
        self.process.stdout.close()
        self.process = None


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _frame(message: dict) -> bytes:
    data = json.dumps(message, ensure_ascii=False).encode()
    return struct.pack(">I", len(data)) + data


async def _ready(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        remove(fd)


async def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await _ready(fd, writable=True)
        except BrokenPipeError:
            raise EOFError from None


async def _read(fd: int, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = os.read(fd, size - len(data))
        except BlockingIOError:
            await _ready(fd, writable=False)
            continue
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


# -- the child ---------------------------------------------------------------------------------------------------


def _child(memory_bytes: int, parent: int) -> None:
    import resource

    from tessera.tokenizer.chat_template import render_client_chat

    if sys.platform == "linux":  # die with the server, even if it is SIGKILLed
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            return  # it died before the line above
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server; it kills us at shutdown
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests, replies = os.fdopen(0, "rb", buffering=0), os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to the log, not into the protocol
    replies.write(READY)
    replies.flush()
    while True:
        (size,) = struct.unpack(">I", _read_exactly(requests, 4))
        request = json.loads(_read_exactly(requests, size))
        try:
            prompt = render_client_chat(request["template"], request["messages"], request["add_generation_prompt"],
                                        request["special_tokens"], request["max_bytes"])
            reply = {"prompt": prompt}
        except MemoryError:
            reply = {"memory": True}
        except TemplateLimitError as error:
            reply = {"error": _printable(error), "limit": True, "field": error.field}
        except ChatTemplateError as error:
            reply = {"error": _printable(error)}
        try:
            data = json.dumps(reply).encode()  # ASCII: a lone surrogate in a message cannot break the reply
        except MemoryError:
            data = b'{"memory": true}'
        replies.write(struct.pack(">I", len(data)) + data)
        replies.flush()


def _printable(error: Exception) -> str:
    # Messages can quote the template's own strings, lone surrogates included: those cannot go into a status.
    return str(error).encode("utf-8", "replace").decode()


def _read_exactly(file, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = file.read(size - len(data))
        if not chunk:
            raise SystemExit(0)  # the server closed the pipe
        data += chunk
    return bytes(data)


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]))
