"""`tessera quantize`: a float checkpoint written as an int8 one in compressed-tensors' W8A8 format
(int8_checkpoint.py), every decoder projection at the per-channel values `--quantization int8` computes at load.
A server then starts from about half the bytes (the embedding, the LM head and the norms stay as they are) and
serves exactly what `--quantization int8` serves on the float checkpoint.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

from tessera.model_config import CheckpointError, ModelConfig
from tessera.worker.checkpoint import INDEX_FILE, SINGLE_FILE, iter_weights
from tessera.worker.models.int8_linear import quantize_rows

PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
SCHEME = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
        "output_activations": None}},
    "ignore": ["lm_head"],
}


def write_int8_checkpoint(source: str | Path, target: str | Path) -> int:
    """Writes `source` (a float checkpoint directory) to the new or empty directory `target` with its projections
    in int8, one safetensors file (the whole checkpoint is held in memory once); returns how many projections."""
    source, target = Path(source), Path(target)
    if ModelConfig.from_pretrained(source).int8_checkpoint is not None:
        raise CheckpointError(f"{source}: already an int8 checkpoint")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target}: exists and is not an empty directory")
    tensors, count = {}, 0
    for name, tensor in iter_weights(source):
        if PROJECTION.fullmatch(name):
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale"] = quantize_rows(tensor)
            count += 1
        else:
            tensors[name] = tensor
    if count == 0:
        raise CheckpointError(f"{source}: no decoder projections (model.layers.N...._proj.weight) to quantize")
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():  # the tokenizer, generation_config.json, a model card...
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(path, target / path.name)
    save_file(tensors, str(target / SINGLE_FILE), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": SCHEME}, indent=2) + "\n")
    return count
