"""Llama: the base family. Dense SwiGLU MLP in every layer; the names here are shared by Mixtral."""

import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.models.layers import SwiGLUMLP

HF_CLASS = "LlamaForCausalLM"
EMBED_TOKENS = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"  # absent when tie_word_embeddings: EMBED_TOKENS serves as the head


def layer_prefix(layer: int) -> str:
    """Prefix of layer `layer`'s weights: self_attn.*, input_layernorm, post_attention_layernorm, ffn."""
    return f"model.layers.{layer}."


def load_ffn(config: ModelConfig, layer: int, reader: CheckpointReader, dtype: torch.dtype) -> SwiGLUMLP:
    """The dense MLP of `layer`: mlp.{gate,up,down}_proj."""
    prefix = layer_prefix(layer) + "mlp."
    return SwiGLUMLP.load(reader, f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight",
                          f"{prefix}down_proj.weight", dtype)
