"""The model the repository ships: it loads, generates, and decodes through the tokenizer service."""
from __future__ import annotations

from pathlib import Path

import grpc
import torch

from servers import ServerProcess
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.sampling_params import SamplingParams
from tessera.engine.v1 import engine_pb2
from tessera.tokenizer.tokenizer import Tokenizer
from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"
PROMPT = "def fibonacci(n):"


def test_the_shipped_files_are_a_small_llama_checkpoint():
    files = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert (DEMO / "model.safetensors").stat().st_size <= 25 * 2**20
    engine = LLMEngine(EngineConfig(model=str(DEMO), kv_cache_memory=64 << 20))
    assert engine.model_config.architecture == "LlamaForCausalLM"
    assert Tokenizer(DEMO).chat_template is not None


def test_greedy_completion_matches_transformers_and_looks_like_python():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = Tokenizer(DEMO)
    prompt = tokenizer.encode(PROMPT)
    engine = LLMEngine(EngineConfig(model=str(DEMO), kv_cache_memory=64 << 20))
    ours = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=48))[0].token_ids

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=48)[0, len(prompt):].tolist()
    eos = set(engine.model_config.eos_token_ids)
    cut = next((i + 1 for i, t in enumerate(reference) if t in eos), len(reference))
    assert ours == reference[:cut]
    text = AutoTokenizer.from_pretrained(DEMO).decode(ours, skip_special_tokens=True)
    # A trained model continues a function definition with an indented body.
    assert text.startswith("\n    ") and any(word in text for word in ("return", "if", "for", "=", "("))


def test_served_through_the_tokenizer_service():
    with ServerProcess("engine", "--model", str(DEMO), "--kv-cache-memory", "64MiB") as engine, \
            ServerProcess("tokenizer", "--model", str(DEMO), "--engine", engine.address) as front:
        with grpc.insecure_channel(front.address) as channel:
            request = tokenizer_pb2.GenerateRequest(text=PROMPT, sampling=engine_pb2.SamplingParams(temperature=0.0),
                                                    stopping=engine_pb2.StoppingParams(max_tokens=32))
            responses = list(tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(request))
            chat = tokenizer_pb2.GenerateRequest(sampling=engine_pb2.SamplingParams(temperature=0.0),
                                                 stopping=engine_pb2.StoppingParams(max_tokens=8))
            chat.messages.add(role="user", content="Write a function.")
            chat_responses = list(tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(chat))
    ids = [t for r in responses for t in r.token_ids]
    assert "".join(r.text for r in responses) == Tokenizer(DEMO).decode(ids, skip_special_tokens=True)
    assert responses[-1].finish_reason in (engine_pb2.FINISH_REASON_STOP, engine_pb2.FINISH_REASON_LENGTH)
    assert chat_responses[-1].usage.completion_tokens >= 1
