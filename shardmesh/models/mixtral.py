"""Mixtral: Llama's layers with a sparse MoE block instead of the MLP.

The stage holds only the gate (`block_sparse_moe.gate.weight`); experts
(`block_sparse_moe.experts.E.{w1,w2,w3}.weight`, w1 = gate, w3 = up, w2 = down) live on expert servers.
"""

import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.models.layers import SwiGLUMLP
from shardmesh.models.llama import EMBED_TOKENS, FINAL_NORM, LM_HEAD, layer_prefix  # noqa: F401 (shared names)
from shardmesh.models.moe import MoEGate

HF_CLASS = "MixtralForCausalLM"


def load_ffn(config: ModelConfig, layer: int, reader: CheckpointReader, dtype: torch.dtype,
             group=None) -> MoEGate:
    """The MoE gate of `layer` (its router weight [E, H]), whole on every TP rank; never an expert."""
    return MoEGate(reader.get(layer_prefix(layer) + "block_sparse_moe.gate.weight", dtype), config.experts_per_token)


def expert_weight_names(layer: int, expert: int) -> tuple[str, str, str]:
    """(w1, w2, w3) names on disk of one expert."""
    prefix = f"{layer_prefix(layer)}block_sparse_moe.experts.{expert}."
    return f"{prefix}w1.weight", f"{prefix}w2.weight", f"{prefix}w3.weight"


def load_expert(reader: CheckpointReader, layer: int, expert: int, dtype: torch.dtype) -> SwiGLUMLP:
    """One expert as a SwiGLU MLP: w2(silu(w1 x) * w3 x)."""
    w1, w2, w3 = expert_weight_names(layer, expert)
    return SwiGLUMLP.load(reader, gate=w1, up=w3, down=w2, dtype=dtype)
