"""Device choice (--device auto|cpu|cuda|tpu, TESSERA_DEVICE), the backend and dtype that go with it, and the
transformers parity test on a GPU where one is present."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

from pathlib import Path

import grpc
import pytest
import torch
from hf_reference import assert_greedy_matches_transformers
from test_engine import NEW_TOKENS, random_prompts
from tiny_checkpoints import PRESETS, preset_checkpoint

from tessera.worker import device as device_module
from tessera.worker.attention.torch_backend import TorchAttentionBackend
from tessera.worker.device import DeviceError, attention_backend_for, default_dtype_for, resolve_device
from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.engine.request import FinishReason
from tessera.sampling_params import SamplingParams
from tessera.worker.worker import Worker, WorkerConfig

DEMO = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device: GPU parity runs only where one is present")


def test_cpu_and_the_environment_variable(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("TESSERA_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv("TESSERA_DEVICE", "gpu")
    with pytest.raises(DeviceError, match="'gpu' is not one of auto, cpu, cuda, tpu .*TESSERA_DEVICE"):
        resolve_device(None)
    assert resolve_device("CPU") == torch.device("cpu")  # an explicit name wins over the variable


def test_auto_takes_the_best_device_present(monkeypatch):
    monkeypatch.delenv("TESSERA_DEVICE", raising=False)
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "xla" if device_module._tpu_present() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected


@NO_CUDA
def test_cuda_without_cuda_says_what_to_install(monkeypatch):
    if torch.version.cuda is None:
        with pytest.raises(DeviceError, match=r"built without CUDA.*pip install -e \.\[cuda\]"):
            resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build on a machine with no GPU
    with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but no Triton
    monkeypatch.setattr(device_module, "_has_triton", lambda: False)
    with pytest.raises(DeviceError, match=r"Triton.*pip install -e \.\[cuda\]"):
        resolve_device("cuda")


@NO_CUDA
def test_worker_refuses_a_missing_device_before_loading_anything(tmp_path):
    with pytest.raises(DeviceError, match="cuda"):
        Worker(WorkerConfig(str(tmp_path / "no-such-model"), device="cuda"))


def test_tpu_without_torch_xla_says_what_to_install():
    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed here")
    with pytest.raises(DeviceError, match=r"torch_xla: `pip install -e \.\[tpu\]`"):
        resolve_device("tpu")


def fake_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


def test_tpu_and_its_backend_through_torch_xla(monkeypatch):
    """torch_xla is not installed here: a stand-in shows which calls the TPU path makes, and the backend hook."""
    monkeypatch.setitem(sys.modules, "torch_xla", fake_module("torch_xla", device=lambda: torch.device("xla")))
    assert resolve_device("tpu") == torch.device("xla")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert resolve_device("auto") == torch.device("xla")
    monkeypatch.setenv("PJRT_DEVICE", "CPU")  # torch_xla on a CPU is for tests, not something auto picks
    assert resolve_device("auto") == torch.device("cpu")

    class XlaAttentionBackend(TorchAttentionBackend):
        name = "xla"

    backend_module = "tessera.worker.attention.xla_backend"
    if importlib.util.find_spec(backend_module) is None:
        with pytest.raises(DeviceError, match="no XLA attention backend"):
            attention_backend_for(torch.device("xla"))
    monkeypatch.setitem(sys.modules, backend_module,
                        fake_module(backend_module, XlaAttentionBackend=XlaAttentionBackend))
    assert isinstance(attention_backend_for(torch.device("xla")), XlaAttentionBackend)


def test_backend_and_dtype_follow_the_device(monkeypatch):
    assert isinstance(attention_backend_for(torch.device("cpu")), TorchAttentionBackend)
    assert default_dtype_for(torch.device("cpu")) is None  # the checkpoint's own
    assert default_dtype_for(torch.device("cpu"), torch.float32) is None  # only auto converts on a CPU
    if importlib.util.find_spec("triton") is not None:
        assert attention_backend_for(torch.device("cuda")).name == "triton"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert default_dtype_for(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # before Ampere
    assert default_dtype_for(torch.device("cuda")) is torch.float16


def test_auto_device_serves_with_no_accelerator_needed(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="auto", block_size=4, kv_cache_memory=1 << 22))
    assert engine.worker.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    completion = engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert len(completion.token_ids) == 3 and completion.finish_reason is FinishReason.LENGTH


@CUDA_ONLY
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cuda_greedy_tokens_and_logprobs_match_transformers(tmp_path_factory, preset):
    """tests/test_engine.py's parity test on the GPU: Triton kernels and CUDA graphs, in float32 (the kernels
    then use true fp32 products), against transformers in float32 on the CPU."""
    model_dir = preset_checkpoint(tmp_path_factory, preset)
    prompts = random_prompts(3, 5, 24, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype="float32", block_size=4,
                                    kv_cache_memory=1 << 22))
    assert engine.worker.attn_backend.name == "triton" and engine.worker.cuda_graphs is not None
    completions = engine.generate(prompts, params)
    assert_greedy_matches_transformers(model_dir, prompts, completions, NEW_TOKENS, atol=1e-3)


@CUDA_ONLY
def test_cuda_graphs_give_the_eager_tokens_and_bfloat16_is_the_default(tmp_path_factory):
    model_dir = preset_checkpoint(tmp_path_factory, "llama")
    prompts = random_prompts(6, 3, 30, seed=2)  # 6 decodes replay the graph of 8, with 2 padding rows
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    config = EngineConfig(model=str(model_dir), device="cuda", dtype="float32", block_size=4,
                          kv_cache_memory=1 << 22)
    tokens = {}
    for eager in (False, True):
        worker = Worker(WorkerConfig(config.model, "float32", "cuda", 4, 1 << 22, enforce_eager=eager))
        assert (worker.cuda_graphs is None) == eager
        tokens[eager] = [c.token_ids for c in LLMEngine(config, worker=worker).generate(prompts, params)]
    assert tokens[False] == tokens[True]

    worker = Worker(WorkerConfig(config.model, None, "cuda", 4, 1 << 22))
    assert worker.model_config.dtype is default_dtype_for(worker.device)  # bfloat16 (float16 before Ampere)
    bf16 = LLMEngine(config, worker=worker).generate(prompts, params)
    assert all(len(c.token_ids) == 12 for c in bf16)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_dtype_auto_serves_fp32_checkpoints_in_bf16_on_cpus_that_have_it(monkeypatch, native_bf16):
    """The CLI's default: bf16 where the CPU runs it natively (AVX512-BF16 or AMX), the checkpoint's own
    elsewhere; a bf16 checkpoint stays bf16 and a named dtype always wins."""
    from tessera.cli import build_parser
    from tessera.worker import device

    assert build_parser().parse_args(["engine"]).dtype == "auto"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert device.cpu_has_native_bf16() is native_bf16
    assert default_dtype_for(cpu, torch.float32, auto=True) is (torch.bfloat16 if native_bf16 else None)
    assert default_dtype_for(cpu, torch.bfloat16, auto=True) is None
    model_dir = str(DEMO)
    auto = Worker(WorkerConfig(model_dir, "auto", "cpu", 4, 1 << 22)).model_config.dtype
    assert auto is (torch.bfloat16 if native_bf16 else torch.float32)
    assert Worker(WorkerConfig(model_dir, "float32", "cpu", 4, 1 << 22)).model_config.dtype is torch.float32


def test_dtype_auto_over_the_wire_matches_what_the_cpu_offers():
    """`tessera engine --dtype auto` on this machine: GetModelInfo tells the dtype auto chose."""
    from servers import ServerProcess
    from tessera.engine.v1 import engine_pb2, engine_pb2_grpc
    from tessera.worker.device import cpu_has_native_bf16

    with ServerProcess("engine", "--model", str(DEMO), "--dtype", "auto", "--kv-cache-memory", "16MiB") as engine:
        with grpc.insecure_channel(engine.address) as channel:
            info = engine_pb2_grpc.EngineStub(channel).GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=30)
    assert info.dtype == ("bfloat16" if cpu_has_native_bf16() else "float32")
