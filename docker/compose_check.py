"""The host side of `make test-compose`: talks to the composed services through their published ports.

  compose_check.py stream               a greedy Generate through the tokenizer equals the host's in-process engine
  compose_check.py stream-through-stop CMD...
                                        a long stream keeps going while CMD (`docker-compose stop`) runs, and ends
                                        with every token it asked for
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
from tessera.sampling_params import SamplingParams
from tessera.tokenizer.tokenizer import Tokenizer
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"
ADDRESS = "localhost:50051"
ENGINE = "localhost:50052"
PROMPT = "def fibonacci(n):"


def generate(max_tokens: int, on_first_token=None) -> tuple[list[int], str]:
    request = tokenizer_pb2.GenerateRequest(
        text=PROMPT, sampling=engine_pb2.SamplingParams(temperature=0.0),
        stopping=engine_pb2.StoppingParams(max_tokens=max_tokens, ignore_eos=True))
    tokens, finish = [], ""
    with grpc.insecure_channel(ADDRESS) as channel:
        for response in tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(request, timeout=120):
            if not tokens and on_first_token is not None:
                on_first_token()
            tokens += response.token_ids
            if response.finish_reason:
                finish = engine_pb2.FinishReason.Name(response.finish_reason)
    return tokens, finish


def check_stream() -> None:
    served, finish = generate(48)
    with grpc.insecure_channel(ENGINE) as channel:  # the dtype the engine chose (--dtype auto)
        info = engine_pb2_grpc.EngineStub(channel).GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=30)
    engine = LLMEngine(EngineConfig(model=str(DEMO), dtype=info.dtype, kv_cache_memory=64 << 20))
    prompt = Tokenizer(DEMO).encode(PROMPT)
    expected = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))[0]
    assert served == expected.token_ids, f"served {served}\n  in-process {expected.token_ids}"
    assert finish == "FINISH_REASON_LENGTH", finish
    print(f"stream: {len(served)} tokens through {ADDRESS}, identical to the in-process engine ({info.dtype}), "
          f"{finish}")


def check_stream_through_stop(command: list[str]) -> None:
    stopper: list[subprocess.Popen] = []
    tokens, finish = generate(400, on_first_token=lambda: stopper.append(subprocess.Popen(command)))
    assert stopper and stopper[0].wait(timeout=120) == 0, "the stop command failed"
    assert len(tokens) == 400 and finish == "FINISH_REASON_LENGTH", (len(tokens), finish)
    print(f"stream-through-stop: all {len(tokens)} tokens arrived while `{' '.join(command)}` ran, {finish}")


if __name__ == "__main__":
    if sys.argv[1] == "stream":
        check_stream()
    elif sys.argv[1] == "stream-through-stop":
        check_stream_through_stop(sys.argv[2:])
    else:
        sys.exit(__doc__)
