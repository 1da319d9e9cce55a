"""tessera.engine.v1 messages <-> the engine's own types. Unset proto fields take the documented defaults."""
from __future__ import annotations

from tessera.engine.request import FinishReason, RequestOutput
from tessera.engine.structured_output import StructuredOutput
from tessera.sampling_params import InvalidParam, SamplingParams
from tessera.step import TokenLogprobs
from tessera.engine.v1 import engine_pb2

FINISH_REASONS = {
    FinishReason.STOP: engine_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: engine_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: engine_pb2.FINISH_REASON_ABORT,
}


def sampling_params_from_proto(
    sampling: engine_pb2.SamplingParams,
    stopping: engine_pb2.StoppingParams,
    output: engine_pb2.OutputOptions,
    num_prompt_tokens: int,
    max_model_len: int,
) -> SamplingParams:
    def optional(message, name, default):
        return getattr(message, name) if message.HasField(name) else default

    return SamplingParams(
        temperature=optional(sampling, "temperature", 1.0),
        top_p=optional(sampling, "top_p", 1.0),
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        seed=optional(sampling, "seed", None),
        repetition_penalty=optional(sampling, "repetition_penalty", 1.0),
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logit_bias=dict(sampling.logit_bias),
        max_tokens=optional(stopping, "max_tokens", max(max_model_len - num_prompt_tokens, 1)),
        min_tokens=stopping.min_tokens,
        stop_token_ids=list(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos,
        logprobs=optional(output, "logprobs", None),
        prompt_logprobs=optional(output, "prompt_logprobs", None),
    )


def structured_output_from_proto(message: engine_pb2.StructuredOutput) -> StructuredOutput | None:
    """None when no constraint is set (json_object=false counts as unset)."""
    kind = message.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not message.json_object):
        return None
    value = tuple(message.choice.choices) if kind == "choice" else getattr(message, kind)
    return StructuredOutput(**{kind: value}, any_whitespace=message.any_whitespace)


def engine_params_from_request(request: engine_pb2.GenerateRequest, max_model_len: int) -> SamplingParams:
    if request.stopping.stop:
        raise InvalidParam("stopping.stop", "stop strings need text: use tessera.tokenizer.v1.TextGeneration")
    return sampling_params_from_proto(
        request.sampling, request.stopping, request.output, len(request.prompt_token_ids), max_model_len
    )


def logprob_to_proto(entry: TokenLogprobs) -> engine_pb2.TokenLogprob:
    return engine_pb2.TokenLogprob(
        token_id=entry.token_id,
        logprob=entry.logprob,
        top_logprobs=[engine_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.top],
    )


def output_to_proto(request_id: str, index: int, out: RequestOutput) -> engine_pb2.GenerateResponse:
    response = engine_pb2.GenerateResponse(
        request_id=request_id,
        index=index,
        token_ids=out.new_token_ids,
        logprobs=[logprob_to_proto(entry) for entry in out.new_logprobs],
    )
    if out.prompt_logprobs is not None and index == 0:
        response.prompt_logprobs.extend(logprob_to_proto(entry) for entry in out.prompt_logprobs)
    if out.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[out.finish_reason]
        response.usage.CopyFrom(
            engine_pb2.Usage(
                prompt_tokens=out.usage.prompt_tokens,
                completion_tokens=out.usage.completion_tokens,
                cached_tokens=out.usage.cached_tokens,
            )
        )
    return response
