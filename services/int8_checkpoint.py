"""Checkpoints quantized to int8 ahead of time, in the compressed-tensors format: what llm-compressor writes (its
W8A8 INT8 scheme) and vLLM loads. config.json carries

    "quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized",
                            "config_groups": {"group_0": {"targets": ["Linear"],
                                "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"},
                                "input_activations": {"num_bits": 8, "type": "int", "symmetric": true,
                                                      "strategy": "token", "dynamic": true}}},
                            "ignore": ["lm_head"]}

and each quantized linear layer `X` is stored as `X.weight` (int8 [out, in]) and `X.weight_scale` ([out, 1]), with
weight ~= weight_scale * int8 values. That is the arithmetic of tessera's `--quantization int8` (weights per
channel, activations per token on every call), so these values are used as they are, not quantized again.

Only that scheme is read: any other method, format or parameter (4-bit, groups, asymmetric, static activation
scales, weight-only) is refused with the field that says so, rather than loaded into a model it does not fit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
INPUT_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


@dataclass(frozen=True)
class Int8Checkpoint:
    """The layers the checkpoint left in floating point: module names, or "re:" + a pattern matched from the start
    of the name (compressed-tensors' convention)."""

    ignore: tuple[str, ...] = ()

    def quantized(self, module_name: str) -> bool:
        """Whether the checkpoint holds the linear layer `module_name` (a Hugging Face name) in int8."""
        for entry in self.ignore:
            if (re.match(entry[3:], module_name) is not None) if entry.startswith("re:") else entry == module_name:
                return False
        return True


def read_int8_checkpoint(config: dict[str, Any], config_path: Path, error: type[Exception]) -> Int8Checkpoint | None:
    """The checkpoint's int8 scheme from config.json, None for an unquantized checkpoint; `error` (CheckpointError)
    for any quantization this module does not read."""
    q = config.get("quantization_config")
    if q is None:
        return None
    where = f"{config_path}: quantization_config"

    def refuse(field: str, value: Any, why: str) -> None:
        raise error(f"{where}.{field} is {value!r}: {why}")

    if not isinstance(q, dict):
        refuse("", q, "not an object")
    if q.get("quant_method") != "compressed-tensors":
        refuse("quant_method", q.get("quant_method"),
               "only compressed-tensors int8 checkpoints (W8A8, per-channel weights) are read; serve the float "
               "checkpoint with --quantization int8 instead")
    if q.get("format") != "int-quantized":
        refuse("format", q.get("format"), "only 'int-quantized' (int8 weights stored as int8) is read")
    if q.get("quantization_status", "compressed") != "compressed":
        refuse("quantization_status", q.get("quantization_status"), "the weights must be stored compressed")
    if q.get("kv_cache_scheme") is not None:
        refuse("kv_cache_scheme", q["kv_cache_scheme"], "static KV cache scales are not read (--kv-cache-dtype "
                                                        "int8 quantizes the cache on the fly)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        refuse("config_groups", groups, "expected at least one group")
    for name, group in groups.items():
        at = f"config_groups.{name}"
        if not isinstance(group, dict):
            refuse(at, group, "not an object")
        if group.get("targets") != ["Linear"]:
            refuse(f"{at}.targets", group.get("targets"), "only ['Linear'] (every linear layer) is read")
        _require(group.get("weights"), WEIGHTS, f"{at}.weights", refuse)
        if group["weights"].get("group_size") is not None:
            refuse(f"{at}.weights.group_size", group["weights"]["group_size"], "only per-channel scales are read")
        if group.get("input_activations") is None:
            refuse(f"{at}.input_activations", None,
                   "weight-only int8 is not served: tessera's int8 layers quantize activations per token (W8A8)")
        _require(group["input_activations"], INPUT_ACTIVATIONS, f"{at}.input_activations", refuse)
        if group.get("output_activations") is not None:
            refuse(f"{at}.output_activations", group["output_activations"], "output quantization is not read")
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(entry, str) for entry in ignore):
        refuse("ignore", ignore, "expected a list of layer names")
    return Int8Checkpoint(tuple(ignore))


def _require(args: Any, expected: dict[str, Any], at: str, refuse) -> None:
    if not isinstance(args, dict):
        refuse(at, args, "not an object")
    for key, value in expected.items():
        if args.get(key, False if isinstance(value, bool) else None) != value:
            refuse(f"{at}.{key}", args.get(key), f"only {value!r} is read")
