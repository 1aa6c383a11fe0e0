"""Llama: the base family. Dense SwiGLU MLP in every layer; the names here are shared by Mixtral."""

import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.models.parallel import ParallelSwiGLUMLP
from shardmesh.tp_group import SINGLE, TPGroup

HF_CLASS = "LlamaForCausalLM"
EMBED_TOKENS = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"  # absent when tie_word_embeddings: EMBED_TOKENS serves as the head


def layer_prefix(layer: int) -> str:
    """Prefix of layer `layer`'s weights: self_attn.*, input_layernorm, post_attention_layernorm, ffn."""
    return f"model.layers.{layer}."


def load_ffn(config: ModelConfig, layer: int, reader: CheckpointReader, dtype: torch.dtype,
             group: TPGroup = SINGLE) -> ParallelSwiGLUMLP:
    """The dense MLP of `layer`: mlp.{gate,up,down}_proj (this rank's slice of each)."""
    prefix = layer_prefix(layer) + "mlp."
    return ParallelSwiGLUMLP.load(reader, f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight",
                                  f"{prefix}down_proj.weight", dtype, group)
