"""The front door: tessera.tokenizer.v1.Tokenizer and tessera.tokenizer.v1.TextGeneration over grpc.aio.

Generate turns text or chat messages into token ids, runs each of the n samples as its own Engine/Generate
call (on the least loaded engine, failing over while nothing has streamed yet), and streams text deltas:
incrementally detokenized (never a broken character), with stop strings held back until they cannot match.
A stop-string match aborts that sample's engine request; leaving the stream early cancels every engine call.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid

import grpc

from tessera.engine.v1 import engine_pb2
from tessera.limits import (CALL_TAG_CHARS, MAX_REQUEST_BYTES, Limits, check_generation, check_messages,
                            check_prompt_bytes, check_stop_strings, sample_seed)
from tessera.sampling_params import InvalidParam
from tessera.serving import RpcError, Server, request_id_from, rpc_method
from tessera.tokenizer.chat_sandbox import ChatSandbox, SandboxLimits, SandboxUnavailable
from tessera.tokenizer.chat_template import ChatTemplateError, TemplateLimitError
from tessera.tokenizer.detokenizer import IncrementalDetokenizer
from tessera.tokenizer.router import EngineHandle, EngineRouter
from tessera.tokenizer.stop_strings import StopStringMatcher
from tessera.tokenizer.tokenizer import Tokenizer
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger("tessera.tokenizer")

TOKENIZER_SERVICE = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name
GENERATION_SERVICE = tokenizer_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
MAX_TEMPLATE_CHARS = 64 << 10  # client-supplied templates: bound the work a request can ask for


def optional(message, name: str, default):
    return getattr(message, name) if message.HasField(name) else default


def text_of_tokens(ids, finished: bool, detokenizer: IncrementalDetokenizer,
                   stops: StopStringMatcher) -> tuple[str, int, str | None]:
    """(text to send, how many of `ids` to keep, the stop string that ended the stream or None) for one engine
    message. Token by token, since a stream that lags gets several per message: a stop string ends the
    completion at the token that completed it. A finished stream also flushes what was held back."""
    text, kept, matched = "", len(ids), None
    for i in range(len(ids) + finished):
        piece, matched = stops.push(detokenizer.push(ids[i : i + 1]) if i < len(ids) else detokenizer.flush())
        text += piece
        if matched is not None:
            return text, min(i + 1, len(ids)), matched
    if finished:
        text += stops.flush()
        matched = stops.matched
    return text, kept, matched


async def render_messages(tokenizer: Tokenizer, messages, add_generation_prompt: bool, template: str | None,
                          limits: Limits, sandbox: ChatSandbox | None = None) -> str:
    """The chat as prompt text; the messages and then the rendered prompt within limits.max_prompt_bytes.

    The model's template (the operator's) renders on a thread. A template from the request is code from the
    client: it renders only if the server allows it (`sandbox`), in a process that is killed at its time or
    memory limit (chat_sandbox.py), and nothing of it runs here."""
    if template is not None:
        if sandbox is None:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           "chat_template: this server does not render chat templates sent by clients (its operator "
                           "can allow them with --allow-client-chat-template); leave chat_template unset to use "
                           "the model's")
        if len(template) > MAX_TEMPLATE_CHARS:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"chat_template: longer than {MAX_TEMPLATE_CHARS} characters")
    try:
        if template is None:
            prompt = await asyncio.to_thread(_render_model_template, tokenizer, messages, add_generation_prompt, limits)
        else:
            chat = await asyncio.to_thread(_chat, messages, limits)
            prompt = await sandbox.render(template, chat, add_generation_prompt, tokenizer.special_tokens_map,
                                          limits.max_prompt_bytes)  # the sandbox stops at that size
            check_prompt_bytes("messages", len(prompt.encode()), limits, "the chat rendered with its template")
    except TemplateLimitError as error:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{error.field}: {error}") from None
    except ChatTemplateError as error:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"messages: the chat template failed: {error}") from None
    except SandboxUnavailable as error:
        raise RpcError(grpc.StatusCode.UNAVAILABLE, f"chat_template: {error}") from None
    return prompt


def _chat(messages, limits: Limits) -> list[dict]:
    check_messages(messages, limits)
    chat = [{"role": m.role, "content": m.content} for m in messages]
    if not chat:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "messages: must not be empty")
    return chat


def _render_model_template(tokenizer: Tokenizer, messages, add_generation_prompt: bool, limits: Limits) -> str:
    chat = _chat(messages, limits)
    if tokenizer.chat_template is None:
        raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "messages: the model has no chat template (a request's chat_template "
                                                       "renders where --allow-client-chat-template is set)")
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt)
    check_prompt_bytes("messages", len(prompt.encode()), limits, "the chat rendered with its template")
    return prompt


class TokenizerService(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: Tokenizer, limits: Limits = Limits(), sandbox: ChatSandbox | None = None):
        self.tokenizer = tokenizer
        self.limits = limits
        self.sandbox = sandbox  # renders clients' chat templates; None: they are refused

    @rpc_method
    async def Tokenize(self, request, context):
        check_prompt_bytes("text", len(request.text.encode()), self.limits, "the text")
        ids, offsets = await asyncio.to_thread(self.tokenizer.encode_with_offsets, request.text,
                                               optional(request, "add_special_tokens", True))
        response = tokenizer_pb2.TokenizeResponse(token_ids=ids)
        if request.return_offsets:
            response.offsets.extend(tokenizer_pb2.TokenOffset(start=s, end=e) for s, e in offsets)
        return response

    @rpc_method
    async def Detokenize(self, request, context):
        def decode() -> str:  # on a thread: a request may hold millions of ids
            bad = next((t for t in request.token_ids if t >= self.tokenizer.vocab_size), None)
            if bad is not None:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"token_ids: {bad} is outside the vocabulary [0, {self.tokenizer.vocab_size})")
            return self.tokenizer.decode(request.token_ids, optional(request, "skip_special_tokens", True))

        return tokenizer_pb2.DetokenizeResponse(text=await asyncio.to_thread(decode))

    @rpc_method
    async def RenderChat(self, request, context):
        prompt = await render_messages(self.tokenizer, request.messages, optional(request, "add_generation_prompt", True),
                                       optional(request, "chat_template", None), self.limits, self.sandbox)
        ids = await asyncio.to_thread(self.tokenizer.encode, prompt, add_special_tokens=False)  # the template wrote BOS
        return tokenizer_pb2.RenderChatResponse(prompt=prompt, token_ids=ids)

    @rpc_method
    async def GetTokenizerInfo(self, request, context):
        tok = self.tokenizer

        def special(token_id):
            return tokenizer_pb2.SpecialToken(text=tok.convert_ids_to_tokens(token_id), id=token_id)

        response = tokenizer_pb2.GetTokenizerInfoResponse(
            vocab_size=tok.vocab_size,
            eos_tokens=[special(i) for i in tok.eos_token_ids],
            special_tokens=[special(i) for i in sorted(tok.all_special_ids)],
            has_chat_template=tok.chat_template is not None,
        )
        if tok.bos_token_id is not None:
            response.bos_token.CopyFrom(special(tok.bos_token_id))
        if tok.model_max_length is not None:
            response.model_max_length = tok.model_max_length
        return response


class TextGenerationService(tokenizer_pb2_grpc.TextGenerationServicer):
    def __init__(self, tokenizer: Tokenizer, router: EngineRouter, limits: Limits = Limits(),
                 sandbox: ChatSandbox | None = None):
        self.tokenizer = tokenizer
        self.router = router
        self.limits = limits
        self.sandbox = sandbox  # renders clients' chat templates; None: they are refused

    async def prompt_ids(self, request) -> list[int]:
        """Tokenized on a thread: the text's size is checked before, a chat's in render_messages."""
        if request.text:
            return await asyncio.to_thread(self.tokenizer.encode, request.text,
                                           optional(request, "add_special_tokens", True))
        prompt = await render_messages(self.tokenizer, request.messages, optional(request, "add_generation_prompt", True),
                                       optional(request, "chat_template", None), self.limits, self.sandbox)
        return await asyncio.to_thread(self.tokenizer.encode, prompt, add_special_tokens=False)

    def check_prompt_length(self, prompt_ids: list[int]) -> None:
        """The engines' own check (OUT_OF_RANGE), made once here rather than by each of n engine calls."""
        max_model_len = max((e.info.max_model_len for e in self.router.engines if e.info is not None), default=None)
        if max_model_len and len(prompt_ids) >= max_model_len:
            raise InvalidParam("prompt_token_ids", f"the prompt has {len(prompt_ids)} tokens; the model allows at "
                                                   f"most {max_model_len - 1}", out_of_range=True)

    @rpc_method
    async def Generate(self, request, context):
        # Bounded work (limits.py), checked before anything is tokenized, copied or sent.
        request_id = request_id_from(context, request.request_id) or uuid.uuid4().hex
        check_generation(request, self.limits)
        check_stop_strings(request.stopping.stop, self.limits)
        if bool(request.text) == bool(request.messages):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "text: set exactly one of text and messages")
        if request.text:
            check_prompt_bytes("text", len(request.text.encode()), self.limits)
        prompt_ids = await self.prompt_ids(request)
        self.check_prompt_length(prompt_ids)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        n = max(request.n, 1)
        base = engine_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids,
            sampling=request.sampling,
            stopping=request.stopping,
            output=request.output,
            priority=request.priority,
            structured_output=request.structured_output,  # the engine compiles it; each sample its own matcher
        )
        base.stopping.ClearField("stop")  # text-level: ours to check
        base.stopping.include_stop_str_in_output = False
        outputs: asyncio.Queue = asyncio.Queue()
        call_tag = secrets.token_hex(CALL_TAG_CHARS // 2)
        tasks = [
            asyncio.create_task(self._sample(request, base, request_id, call_tag, i, n, prompt_ids, deadline, outputs))
            for i in range(n)
        ]
        unfinished = n
        try:
            while unfinished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED:
                    unfinished -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _sample(self, request, base, request_id, call_tag, index, n, prompt_ids, deadline,
                      outputs: asyncio.Queue) -> None:
        try:
            await self._run_sample(request, base, request_id, call_tag, index, n, prompt_ids, deadline, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            outputs.put_nowait(error)

    async def _run_sample(self, request, base, request_id, call_tag, index, n, prompt_ids, deadline, outputs) -> None:
        engine_request = engine_pb2.GenerateRequest()
        engine_request.CopyFrom(base)  # the request less its text-level parts, built once for all n samples
        # The call's own name at the engine: two clients' calls under one request_id never meet there, so a
        # stop string's Abort ends only this sample.
        engine_request.request_id = f"{request_id}@{call_tag}/{index}"
        if n > 1 and request.sampling.HasField("seed"):
            # Distinct, reproducible samples, as the engine makes them (wrapped into int64: no overflow).
            engine_request.sampling.seed = sample_seed(request.sampling.seed, index)
        if index > 0:
            engine_request.output.ClearField("prompt_logprobs")  # sent once, with index 0: the same for every sample
        tried, refusals = [], []
        for engine in self.router.candidates():
            if engine.leaving:
                continue  # it left DNS while an earlier one was tried: its channel may be closed
            tried.append(engine.address)
            try:
                return await self._stream(engine, engine_request, request, request_id, index, prompt_ids, deadline,
                                          outputs)
            except _NotStarted as failure:
                if failure.code is grpc.StatusCode.UNAVAILABLE:
                    self.router.mark_down(engine)
                log.warning("engine %s refused before streaming (%s); trying the next", engine.address, failure)
                refusals.append(failure)
        full = refusals and all(f.code is grpc.StatusCode.RESOURCE_EXHAUSTED for f in refusals)
        raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE,
                       f"no engine could take the request (tried {', '.join(tried)}): {refusals[-1] if refusals else ''}")

    async def _stream(self, engine: EngineHandle, engine_request, request, request_id, index, prompt_ids, deadline,
                      outputs):
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, optional(request, "skip_special_tokens", True))
        stops = StopStringMatcher(request.stopping.stop, request.stopping.include_stop_str_in_output)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        call = engine.stub.Generate(engine_request, timeout=timeout,
                                    metadata=(("x-request-id", engine_request.request_id),))
        engine.in_flight += 1
        started = False
        completion_tokens = 0
        try:
            async for response in call:
                started = True
                finished = response.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED
                ids = response.token_ids
                text, kept, matched = text_of_tokens(ids, finished, detokenizer, stops)
                completion_tokens += kept
                out = tokenizer_pb2.GenerateResponse(
                    request_id=request_id, index=index, text=text, token_ids=ids[:kept],
                    logprobs=response.logprobs[:kept], prompt_logprobs=response.prompt_logprobs,
                )
                if matched is not None:
                    out.finish_reason = engine_pb2.FINISH_REASON_STOP
                    out.matched_stop = matched
                    out.usage.CopyFrom(await self._abort(engine, engine_request.request_id, call, response))
                    out.usage.completion_tokens = completion_tokens
                elif finished:
                    out.finish_reason = response.finish_reason
                    out.usage.CopyFrom(response.usage)
                outputs.put_nowait(out)
                if out.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED:
                    return
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"engine {engine.address} ended the stream unfinished")
        except grpc.aio.AioRpcError as error:
            if not started and error.code() in RETRYABLE:
                raise _NotStarted(error.code(), error.details()) from None
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None and time.monotonic() >= deadline:
                raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline expired") from None
            if error.code() is grpc.StatusCode.UNAVAILABLE:  # it went down mid-stream: say which one
                raise RpcError(grpc.StatusCode.UNAVAILABLE,
                               f"engine {engine.address} failed mid-stream: {error.details()}") from None
            raise
        finally:
            engine.in_flight -= 1
            call.cancel()

    async def _abort(self, engine: EngineHandle, engine_request_id: str, call, last) -> engine_pb2.Usage:
        """Stops the engine request now; its final response (with usage) ends the engine stream."""
        if last.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED:
            return last.usage
        await engine.stub.Abort(engine_pb2.AbortRequest(request_ids=[engine_request_id]), timeout=5)
        usage = last.usage
        async for response in call:
            usage = response.usage
        return usage


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)  # before streaming: try another


class _NotStarted(Exception):
    """The engine refused or failed before streaming anything: safe to retry on another."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code



async def serve_tokenizer(model_dir: str, engines: list[str], port: int, *, host: str = "[::]",
                          metrics_port: int | None = None, grace_seconds: float = 30.0, limits: Limits = Limits(),
                          max_request_bytes: int = MAX_REQUEST_BYTES, tls=None, engine_tls=None,
                          client_chat_templates: SandboxLimits | None = None) -> None:
    """tls: a serving.ServerTls to serve TLS with; engine_tls: a serving.ClientTls for the engines;
    client_chat_templates: render the chat_template of requests in a sandbox with these limits (None: refuse)."""
    server = Server(port, host, grace_seconds, max_request_bytes, tls=tls)
    tokenizer = Tokenizer(model_dir)
    router = EngineRouter(engines, tls=engine_tls)
    sandbox = ChatSandbox(client_chat_templates) if client_chat_templates is not None else None
    services = tokenizer_pb2.DESCRIPTOR.services_by_name
    server.add_servicer(TokenizerService(tokenizer, limits, sandbox), services["Tokenizer"])
    server.add_servicer(TextGenerationService(tokenizer, router, limits, sandbox), services["TextGeneration"])
    bound = await server.start()
    if metrics_port:
        server.serve_metrics(metrics_port)
    await router.start()
    health_task = asyncio.create_task(_follow_engines(server, router))
    log.info("tokenizer on port %d, forwarding to %s", bound, ", ".join(engines))
    try:
        await server.serve_until_signalled()
    finally:
        health_task.cancel()
        if sandbox is not None:
            sandbox.close()  # after the drain: kills a render still running, leaves no process behind
        await router.close()


async def _follow_engines(server: Server, router: EngineRouter) -> None:
    """Tokenizer serves once loaded; TextGeneration (and the overall status) while some engine is up."""
    from grpc_health.v1 import health_pb2

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    await server.health.set(TOKENIZER_SERVICE, serving)
    engines_up = None
    while True:
        up = any(engine.up for engine in router.engines)
        if up != engines_up:
            for name in ("", GENERATION_SERVICE):
                await server.health.set(name, serving if up else not_serving)
            engines_up = up
        await asyncio.sleep(router.poll_seconds)
