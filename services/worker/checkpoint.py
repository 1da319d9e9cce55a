"""Read a Hugging Face checkpoint's safetensors (one file or index + shards) into a ready model.

Only safetensors are read: pickled `.bin` checkpoints could run code when loaded, so they are refused.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tessera.worker.attention.backend import AttentionBackend
from tessera.model_config import CheckpointError, ModelConfig
from tessera.worker.models import model_class
from tessera.worker.models.int8_linear import add_weight_scales
from tessera.worker.models.rope import RotaryEmbedding
from tessera.worker.tensor_parallel import SINGLE, TensorParallel

__all__ = ["CheckpointError", "checkpoint_files", "iter_weights", "load_model"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files holding the weights, checked to exist."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {index_path.name} is missing")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    pickled = " (pickled .bin checkpoints are not loaded: convert them to safetensors)" if any(
        model_dir.glob("*.bin")) else ""
    raise CheckpointError(f"{single}: not found, and no {INDEX_FILE} either{pickled}")


def iter_weights(model_dir: str | Path, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, CPU tensor) for every tensor in the checkpoint, one at a time. lazy: a safetensors
    slice instead, read when indexed (valid until the next item), so that a rank reads only its part."""
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name) if lazy else f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e


def load_model(model_dir: str | Path, attn_backend: AttentionBackend, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", tp: TensorParallel = SINGLE) -> tuple[nn.Module, ModelConfig]:
    """Build the model for the checkpoint's architecture with its weights in `dtype` (default: the checkpoint's);
    under tensor parallelism, this rank's shard, reading only its part of each tensor."""
    config = ModelConfig.from_pretrained(model_dir, dtype)
    # Build on the meta device, then allocate: random init would be wasted, every weight comes from the checkpoint.
    with torch.device("meta"), _default_dtype(config.dtype):
        model = model_class(config.architecture)(config, attn_backend, tp)
    if config.int8_checkpoint is not None:  # the int8 layers' scales load beside their weights
        add_weight_scales(model, config.int8_checkpoint)
    model.to_empty(device=device)
    model.load_weights(iter_weights(model_dir, lazy=True))
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # computed, not loaded, so to_empty left it blank
            module.cos_sin_cache = module.compute_cache().to(device)
    return model.eval(), config


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
