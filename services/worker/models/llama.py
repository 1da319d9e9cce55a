"""The Llama family in one file: Llama 2/3, Mistral, Qwen2 and Qwen3 differ only by flags in ModelConfig.

Tokens arrive as one flat ragged batch ([num_tokens], every request's new tokens back to back) with their
absolute positions; the attention backend knows which tokens belong to which request and where their KV lives.
q/k/v and gate/up are each one fused matmul; load_weights splits the Hugging Face tensors into them. Under
tensor parallelism (tensor_parallel.py) each rank builds its slice of every layer and loads only that slice.

The residual add + RMSNorm, the rotary embedding and SiLU * up may run as fused kernels instead (fused_ops.py:
Triton's with the Triton backend, the native CPU ones with the PyTorch backend), chosen once at construction; they
round like the PyTorch code here, which XLA and every fallback keep running.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tessera.worker.attention.backend import AttentionBackend, AttentionMetadata
from tessera.model_config import CheckpointError, ModelConfig
from tessera.worker.models.fused_ops import FusedOps, NativeLayer, fused_ops_for
from tessera.worker.models.packed_linear import GEMV_ROWS  # the native layer's projections run on the GEMV
from tessera.worker.models.rope import RotaryEmbedding, apply_rotary
from tessera.worker.tensor_parallel import SINGLE, TensorParallel


class RMSNorm(nn.Module):
    """(RMSNorm(x + residual), x + residual): the residual add fused in front of the norm, vLLM style; with no
    residual, (RMSNorm(x), x). `fused`: one kernel pass (x [num_tokens, dim] only) instead of PyTorch ops."""

    def __init__(self, dim: int, eps: float, fused: FusedOps | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = fused.rms_norm if fused is not None else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        # Normalize in float32 and cast back before scaling, the order transformers uses.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype), x


def eager_rotary(q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """rope: the step's (cos, sin) rows, from RotaryEmbedding.forward."""
    return apply_rotary(q, *rope), apply_rotary(k, *rope)


def fused_rotary(kernel):
    """rope: (positions, the float32 cos/sin table); `kernel` (kernels/rotary.py) rotates q and k in place."""
    def rotate(q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        kernel(q, k, *rope)
        return q, k
    return rotate


def span(bounds: tuple[int, int]) -> int:
    return bounds[1] - bounds[0]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attn_backend: AttentionBackend,
                 fused: FusedOps | None = None, tp: TensorParallel = SINGLE):
        super().__init__()
        self.num_heads = span(tp.heads(config.num_attention_heads))
        self.num_kv_heads = span(tp.kv_heads(config.num_attention_heads, config.num_key_value_heads))
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        # Row-parallel: each rank's partial sums are added up, so the bias is added once, by rank 0.
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias and tp.rank == 0)
        self.tp = tp
        if config.qk_norm:  # per head, on strided [num_tokens, heads, head_dim] views: PyTorch ops on every path
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotate = fused_rotary(fused.rotary_) if fused is not None else eager_rotary
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.layer_sliding_window(layer)
        self.attn_backend = attn_backend

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            (q, _), (k, _) = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, k, rope)
        out = self.attn_backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        return self.tp.all_reduce(self.o_proj(out.reshape(n, self.q_size)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, fused: FusedOps | None = None, tp: TensorParallel = SINGLE):
        super().__init__()
        self.silu_mul = fused.silu_mul if fused is not None and fused.silu_mul is not None else None
        self.intermediate_size = config.intermediate_size // tp.size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.mlp_bias and tp.rank == 0)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.silu_mul is not None:
            return self.tp.all_reduce(self.down_proj(self.silu_mul(gate_up)))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attn_backend: AttentionBackend,
                 fused: FusedOps | None = None, tp: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.self_attn = Attention(config, layer, attn_backend, fused, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.mlp = MLP(config, fused, tp)

    def forward(self, x, residual, rope, kv_cache, meta):
        """x: the previous layer's output, not yet added to `residual` (None before the first layer): each norm
        does the add, so the residual stream is (x + residual) after every layer."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, kv_cache, meta), residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    # Checkpoint tensors that become one slice of a fused parameter, in slice order.
    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend, tp: TensorParallel = SINGLE):
        super().__init__()
        tp.check(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
        self.config, self.tp = config, tp
        self.fused = fused_ops_for(attn_backend)
        self.native_layers: list[NativeLayer] | None = None  # set by the worker (fused_ops.native_decode_layers)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_model_len, config.rope_theta, config.rope_scaling)
        # Vocabulary-parallel: this rank's rows of the table (the last rank's padded with zeros).
        self.vocab_rows = tp.vocab_rows(config.vocab_size)
        self.embed_tokens = nn.Embedding(self.vocab_rows, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, attn_backend, self.fused, tp)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.fused)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, self.vocab_rows, bias=False)

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.embed_tokens(input_ids)
        local = input_ids - self.tp.rank * self.vocab_rows
        mine = (local >= 0) & (local < self.vocab_rows)  # other ranks add the rows of the other ids
        x = self.embed_tokens(torch.where(mine, local, 0)) * mine.unsqueeze(-1).to(self.embed_tokens.weight.dtype)
        return self.tp.all_reduce(x)

    def forward(self, input_ids: torch.LongTensor, positions: torch.LongTensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed(input_ids), None
        if self.native_layers is not None and meta.num_decodes == x.shape[0] <= GEMV_ROWS:
            return self._native_decode(x, positions, kv_caches, meta)
        # Once per step for every layer: the eager rotary's cos/sin rows, or what the kernel looks them up in.
        if self.fused is not None:
            rope = (positions, self.rotary_emb.cos_sin_cache)
        else:
            rope = self.rotary_emb(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return self.norm(x, residual)[0]

    def _native_decode(self, x, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """A decode step of a few requests, each layer one native call (fused_ops.py)."""
        residual, table = None, self.rotary_emb.cos_sin_cache
        for layer, kv_cache in zip(self.native_layers, kv_caches, strict=True):
            x, residual = torch.ops.tessera.decode_layer(
                x, residual, positions, table, layer.input_norm, layer.post_norm, layer.eps, layer.weights,
                layer.biases, layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.intermediate, kv_cache,
                meta.block_tables, meta.seq_lens, meta.slot_mapping, layer.scale, layer.window)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor | None:
        """Logits over the whole vocabulary; under tensor parallelism on rank 0 only (None elsewhere). float32, or
        with float32=False on one rank the activations' dtype: all a greedy pick needs, without the copy."""
        if hasattr(self, "lm_head"):  # untied, or a packed copy of the tied table (models/packed_linear.py)
            logits = self.lm_head(hidden)
        else:
            logits = F.linear(hidden, self.embed_tokens.weight)
        if float32 or self.tp.size > 1:
            logits = logits.float()
        return self.tp.gather_vocab(logits, self.config.vocab_size)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the parameters (casting to their dtype); all must be present.
        A tensor may also be a safetensors slice (checkpoint.iter_weights): then only this rank's part is read."""
        slots = self._checkpoint_slots()
        loaded = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue  # computed here / tied to the embedding
            if name not in slots:
                raise CheckpointError(f"unexpected tensor '{name}' in the checkpoint (not part of "
                                      f"{self.config.architecture} as configured by config.json)")
            loaded.add(name)
            if slots[name] is None:
                continue  # another rank's (a row-parallel bias lives on rank 0)
            slot, index, full_shape = slots[name]
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor.get_shape()
            if shape != full_shape:
                raise CheckpointError(f"tensor '{name}' has shape {shape}, expected {full_shape}")
            slot.copy_(tensor[index])
        v0, v1 = self.tp.vocab(self.config.vocab_size)
        if v1 - v0 < self.vocab_rows:  # the last rank's padding rows: never a real token (and never NaN)
            for table in (getattr(self, "lm_head", None), self.embed_tokens):
                if table is not None:
                    table.weight[v1 - v0:].zero_()
        missing = sorted(slots.keys() - loaded)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"tensors missing from the checkpoint: {', '.join(missing[:5])}{more}")

    def _checkpoint_slots(self) -> dict[str, tuple[torch.Tensor, tuple, list[int]] | None]:
        """Hugging Face tensor name -> (the parameter, or the slice of a fused parameter, it fills; the index of
        this rank's part of the tensor; the tensor's full shape), or None for a tensor another rank holds."""
        c, tp, hd = self.config, self.tp, self.config.head_dim
        h0, h1 = tp.heads(c.num_attention_heads)
        k0, k1 = tp.kv_heads(c.num_attention_heads, c.num_key_value_heads)
        i0, i1 = tp.part(c.intermediate_size)
        v0, v1 = tp.vocab(c.vocab_size)
        # Column-parallel tensors: this rank's rows; row-parallel weights: its columns. The rest is whole.
        rows = {"q_proj": (h0 * hd, h1 * hd), "k_proj": (k0 * hd, k1 * hd), "v_proj": (k0 * hd, k1 * hd),
                "gate_proj": (i0, i1), "up_proj": (i0, i1), "embed_tokens": (v0, v1), "lm_head": (v0, v1)}
        columns = {"o_proj": (h0 * hd, h1 * hd), "down_proj": (i0, i1)}
        full_rows = {"q_proj": c.num_attention_heads * hd, "k_proj": c.num_key_value_heads * hd,
                     "v_proj": c.num_key_value_heads * hd, "gate_proj": c.intermediate_size,
                     "up_proj": c.intermediate_size, "embed_tokens": c.vocab_size, "lm_head": c.vocab_size}
        full_columns = {"o_proj": c.num_attention_heads * hd, "down_proj": c.intermediate_size}
        slots = {}
        for name, param in self.named_parameters():
            hf_name = name if name.startswith("lm_head.") else f"model.{name}"
            module_path, _, kind = hf_name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            parts = self.FUSED.get(leaf, (leaf,))
            views = param.split([rows[p][1] - rows[p][0] for p in parts], dim=0) if leaf in self.FUSED else [param]
            for part, view in zip(parts, views, strict=True):
                full = list(view.shape)
                if part in rows:
                    (a, b), index = rows[part], (slice(rows[part][0], rows[part][1]),)
                    full[0] = full_rows[part]
                    if b - a < view.shape[0]:  # the vocabulary's padding rows stay out (a view only then: XLA
                        view = view[: b - a]  # turns a copy into a view into a pending op of the first graph)
                elif part in columns and kind == "weight":
                    index, full[1] = (slice(None), slice(*columns[part])), full_columns[part]
                else:
                    index = (slice(None),) * view.dim()
                slots[f"{parent}.{part}.{kind}" if parent else f"{part}.{kind}"] = (view, index, full)
        if tp.rank > 0:  # row-parallel biases: rank 0 adds them
            for layer in range(c.num_hidden_layers):
                for present, hf_name in ((c.o_proj_bias, f"model.layers.{layer}.self_attn.o_proj.bias"),
                                         (c.mlp_bias, f"model.layers.{layer}.mlp.down_proj.bias")):
                    if present:
                        slots[hf_name] = None
        return slots
