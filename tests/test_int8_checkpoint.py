"""Checkpoints quantized to int8 ahead of time (compressed-tensors' W8A8 INT8 format, services/int8_checkpoint.py):
served with their own int8 values and scales, against transformers running the same W8A8 arithmetic, and every
scheme tessera does not run refused by name."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.engine.engine import EngineConfig, LLMEngine
from tessera.model_config import CheckpointError, ModelConfig
from tessera.sampling_params import SamplingParams
from tessera.worker.models.int8_linear import Int8Linear
from tessera.worker.worker import Worker, WorkerConfig
from tiny_checkpoints import preset_checkpoint

PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
SCHEME = {  # what llm-compressor writes for its W8A8 INT8 preset
    "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                    "group_size": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                              "dynamic": True, "observer": None},
        "output_activations": None}},
    "ignore": ["lm_head"], "kv_cache_scheme": None,
}


def int8_rows(weight: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 values and bf16 scales (as a bf16 checkpoint stores them) with max |row| at
    `levels` steps: not tessera's own 127, so values quantized again at load would come out different."""
    scale = (weight.abs().amax(dim=1, keepdim=True) / levels).bfloat16()
    return torch.round(weight / scale.float()).clamp(-128, 127).to(torch.int8), scale


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """(the float checkpoint, its int8 copy in compressed-tensors' format); one projection reaches -128."""
    source = preset_checkpoint(tmp_path_factory, "llama")
    target = tmp_path_factory.mktemp("llama-w8a8")
    tensors = load_file(source / "model.safetensors")
    for name in [n for n in tensors if PROJECTION.fullmatch(n)]:
        values, scale = int8_rows(tensors[name], 128.0 if "layers.0.self_attn.q_proj" in name else 110.0)
        tensors[name], tensors[name.removesuffix("weight") + "weight_scale"] = values, scale
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": SCHEME}))
    return source, target


class W8A8Reference(torch.nn.Module):
    """The scheme's arithmetic written out: x quantized per row to int8, integer products, both scales."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.values, self.scale, self.bias = values.float(), scale.float().reshape(1, -1), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_scale = x.abs().amax(dim=-1, keepdim=True) / 127
        x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
        y = (torch.round(x / x_scale).clamp(-127, 127) @ self.values.T) * x_scale * self.scale
        return y if self.bias is None else y + self.bias


def reference_model(source: Path, target: Path):
    """transformers' model of the float checkpoint, each projection on the int8 checkpoint's values and the LM
    head on int8 rows at 127 levels (tessera quantizes what a checkpoint leaves in float at load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tensors = load_file(target / "model.safetensors")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                if f"{full}.weight_scale" in tensors:
                    values, scale = tensors[f"{full}.weight"], tensors[f"{full}.weight_scale"]
                else:
                    weight = child.weight.detach()
                    scale = weight.abs().amax(dim=1, keepdim=True) / 127
                    values = torch.round(weight / scale).clamp(-127, 127)
                setattr(module, child_name, W8A8Reference(values, scale, child.bias))
    return model


def test_an_int8_checkpoint_is_served_with_its_own_values_and_scales(checkpoints):
    source, target = checkpoints
    assert ModelConfig.from_pretrained(target).int8_checkpoint.ignore == ("lm_head",)
    worker = Worker(WorkerConfig(str(target), "float32", "cpu", kv_cache_memory=1 << 22))
    assert worker.quantization == "int8" and worker.cpu_matmul == "int8"  # without --quantization
    tensors = load_file(target / "model.safetensors")
    layer = worker.model.layers[0]
    qkv = layer.self_attn.qkv_proj
    assert isinstance(qkv, Int8Linear) and isinstance(layer.mlp.down_proj, Int8Linear)
    parts = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert torch.equal(qkv.weight, torch.cat([tensors[f"{p}.weight"] for p in parts]))
    assert qkv.weight.min() == -128  # kept, not clamped to tessera's own -127
    assert torch.equal(qkv.weight_scale, torch.cat([tensors[f"{p}.weight_scale"] for p in parts]).float().T)
    down = tensors["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(layer.mlp.down_proj.weight, down)
    assert isinstance(worker.model.lm_head, Int8Linear)  # left in float by the checkpoint: quantized at load


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_int8_checkpoint_decodes_as_transformers_does_with_its_int8_arithmetic(checkpoints, dtype):
    source, target = checkpoints
    prompts = [[1, 17, 45, 200, 9], [1, 3, 3, 250, 101, 64, 7, 7]]
    engine = LLMEngine(EngineConfig(model=str(target), dtype=dtype, kv_cache_memory=1 << 22))
    completions = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    model = reference_model(source, target)
    for prompt, completion in zip(prompts, completions):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=12)
        expected = out[0, len(prompt):].tolist()
        if dtype == "float32":
            assert completion.token_ids == expected
        else:  # bf16 activations: the first tokens, before rounding has compounded
            assert completion.token_ids[:4] == expected[:4]


def test_requantizing_the_dequantized_weights_would_not_be_the_same_model(checkpoints):
    """The control: the float weights the int8 checkpoint stands for, quantized again by --quantization int8,
    land on other int8 values (127 levels a row, not the checkpoint's 110)."""
    source, target = checkpoints
    tensors = load_file(target / "model.safetensors")
    name = "model.layers.1.mlp.up_proj"
    dequantized = tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"].float()
    assert not torch.equal(Int8Linear(dequantized, None).weight, tensors[f"{name}.weight"])


def write_config(tmp_path: Path, checkpoint: Path, scheme: dict) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": scheme}))
    return target


def group(**changes) -> dict:
    g = json.loads(json.dumps(SCHEME["config_groups"]["group_0"]))
    for path, value in changes.items():
        keys = path.split("__")
        node = g
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return {**SCHEME, "config_groups": {"group_0": g}}


@pytest.mark.parametrize("scheme, field", [
    ({**SCHEME, "quant_method": "awq"}, "quant_method"),
    ({**SCHEME, "format": "pack-quantized"}, "format"),
    ({**SCHEME, "quantization_status": "frozen"}, "quantization_status"),
    ({**SCHEME, "kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
    (group(weights__num_bits=4), "config_groups.group_0.weights.num_bits"),
    (group(weights__symmetric=False), "config_groups.group_0.weights.symmetric"),
    (group(weights__strategy="group", weights__group_size=128), "config_groups.group_0.weights.strategy"),
    (group(input_activations=None), "config_groups.group_0.input_activations"),
    (group(input_activations__dynamic=False), "config_groups.group_0.input_activations.dynamic"),
    (group(targets=["re:.*q_proj"]), "config_groups.group_0.targets"),
])
def test_other_quantization_schemes_are_refused_by_name(tmp_path, checkpoints, scheme, field):
    target = write_config(tmp_path, checkpoints[0], scheme)
    with pytest.raises(CheckpointError, match=re.escape(f"quantization_config.{field} is")):
        ModelConfig.from_pretrained(target)


def test_a_fused_layer_half_ignored_and_another_quantization_are_refused(tmp_path, checkpoints):
    source, target = checkpoints
    half = write_config(tmp_path, source, {**SCHEME, "ignore": ["lm_head", "re:model\\.layers\\.0\\.self_attn\\.q_"]})
    (half / "model.safetensors").symlink_to(target / "model.safetensors")
    with pytest.raises(CheckpointError, match="only some of model.layers.0.self_attn.q_proj"):
        Worker(WorkerConfig(str(half), "float32", "cpu", kv_cache_memory=1 << 22))
    with pytest.raises(ValueError, match="quantization: 'int4', but .* is an int8 checkpoint"):
        Worker(WorkerConfig(str(target), "float32", "cpu", kv_cache_memory=1 << 22, quantization="int4"))


def test_tessera_quantize_writes_the_demo_model_as_an_int8_checkpoint_that_serves_what_quantization_int8_serves(
        tmp_path, capsys):
    """`tessera quantize`: the demo model's projections at the per-channel values --quantization int8 computes at
    load, in compressed-tensors' format; the same tokens and prompt logprobs as --quantization int8 on the float
    model, from half the file."""
    from tessera.cli import main
    from tessera.tokenizer.tokenizer import Tokenizer

    demo = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"
    target = tmp_path / "demo-w8a8"
    assert main(["quantize", "--model", str(demo), "--output", str(target)]) == 0
    assert "projections in int8" in capsys.readouterr().out
    assert ModelConfig.from_pretrained(target).int8_checkpoint is not None
    assert (target / "tokenizer.json").read_bytes() == (demo / "tokenizer.json").read_bytes()
    assert (target / "model.safetensors").stat().st_size < 0.55 * (demo / "model.safetensors").stat().st_size

    tokenizer = Tokenizer(target)
    prompts = [tokenizer.encode(text) for text in ("def fibonacci(n):", "import os\nimport sys\n", "class Node:")]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)
    runs = []
    for model, quantization in ((target, None), (demo, "int8")):
        engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", quantization=quantization,
                                        kv_cache_memory=16 << 20))
        runs.append(engine.generate(prompts, params))
    for ours, reference in zip(*runs):
        assert ours.token_ids == reference.token_ids
        assert [e.logprob for e in ours.prompt_logprobs[1:]] == [e.logprob for e in reference.prompt_logprobs[1:]]

    # Not over an existing checkpoint, and not twice.
    assert main(["quantize", "--model", str(demo), "--output", str(target)]) == 1
    assert "is not an empty directory" in capsys.readouterr().err
    assert main(["quantize", "--model", str(target), "--output", str(tmp_path / "again")]) == 1
    assert "already an int8 checkpoint" in capsys.readouterr().err


def rank_int8_layers(rank: int, model_dir: str, port: int, out) -> None:
    import os

    from tessera.worker.attention.torch_backend import TorchAttentionBackend
    from tessera.worker.checkpoint import load_model
    from tessera.worker.models.int8_linear import quantize_linear_layers
    from tessera.worker.tensor_parallel import init_tensor_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = load_model(model_dir, TorchAttentionBackend(), "float32", tp=init_tensor_parallel(2, rank))
    quantize_linear_layers(model)
    layer = model.layers[0]
    modules = {"qkv_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
               "gate_up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj}
    # As lists: a tensor sent through the queue lives in shared memory that goes away with this process.
    out.put((rank, {name: (m.weight.tolist(), m.weight_scale.tolist()) for name, m in modules.items()}))
    torch.distributed.destroy_process_group()


def test_each_tensor_parallel_rank_loads_its_share_of_the_int8_values_and_scales(checkpoints):
    """Column-parallel layers (qkv, gate/up): the rank's rows and their scales; row-parallel ones (o, down): its
    columns, with every output channel's scale."""
    from servers import run_ranks

    _, target = checkpoints
    shares = run_ranks(rank_int8_layers, str(target))
    t = load_file(target / "model.safetensors")
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    for rank, layers in shares.items():
        # The tiny llama: 4 heads of 16 (32 rows a rank), 2 KV heads (16), intermediate 128 (64).
        q, kv, inter = (slice(rows * rank, rows * (rank + 1)) for rows in (32, 16, 64))
        expected = {
            "qkv_proj": [torch.cat([t[f"{attn}.q_proj.{k}"][q], t[f"{attn}.k_proj.{k}"][kv],
                                    t[f"{attn}.v_proj.{k}"][kv]]) for k in ("weight", "weight_scale")],
            "o_proj": [t[f"{attn}.o_proj.weight"][:, q], t[f"{attn}.o_proj.weight_scale"]],
            "gate_up_proj": [torch.cat([t[f"{mlp}.gate_proj.{k}"][inter], t[f"{mlp}.up_proj.{k}"][inter]])
                             for k in ("weight", "weight_scale")],
            "down_proj": [t[f"{mlp}.down_proj.weight"][:, inter], t[f"{mlp}.down_proj.weight_scale"]],
        }
        for name, (values, scale) in expected.items():
            weight, weight_scale = layers[name]
            assert weight == values.tolist(), (rank, name)
            assert weight_scale == scale.float().T.tolist(), (rank, name)
