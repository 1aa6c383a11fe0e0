"""A seeded random Mixtral-shaped checkpoint built straight on a device, large enough to measure decode.

checkpoint_maker.make_checkpoint builds through transformers on the CPU in fp32 (minutes for a few GB);
this writes the same on-disk layout (per-expert `block_sparse_moe.experts.E.w{1,2,3}` keys, one
safetensors shard per layer plus an index, a transformers config.json) from tensors drawn on the
device in the target dtype. Weights are N(0, 1/fan_in) so activations stay O(1) through the layers;
norm weights are 1 + 0.1 N(0, 1). The values only need to be finite: this is for throughput.
"""

import dataclasses
import json
import pathlib

import torch
from safetensors.torch import save_file


@dataclasses.dataclass(frozen=True)
class MixtralShape:
    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 4096
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


TINY = MixtralShape(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def layer_shapes(shape: MixtralShape, layer: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of one decoder layer, by its name on disk."""
    H, I, D = shape.hidden_size, shape.intermediate_size, shape.head_dim
    prefix = f"model.layers.{layer}."
    shapes = {
        prefix + "input_layernorm.weight": (H,),
        prefix + "post_attention_layernorm.weight": (H,),
        prefix + "self_attn.q_proj.weight": (shape.num_attention_heads * D, H),
        prefix + "self_attn.k_proj.weight": (shape.num_key_value_heads * D, H),
        prefix + "self_attn.v_proj.weight": (shape.num_key_value_heads * D, H),
        prefix + "self_attn.o_proj.weight": (H, shape.num_attention_heads * D),
        prefix + "block_sparse_moe.gate.weight": (shape.num_local_experts, H),
    }
    for expert in range(shape.num_local_experts):
        experts = f"{prefix}block_sparse_moe.experts.{expert}."
        shapes |= {experts + "w1.weight": (I, H), experts + "w2.weight": (H, I), experts + "w3.weight": (I, H)}
    return shapes


def _draw(name: str, size: tuple[int, ...], generator: torch.Generator, device: str,
          dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(size, generator=generator, device=device)).to(dtype)
    fan_in = size[-1] if name != "model.embed_tokens.weight" else 1
    return (torch.randn(size, generator=generator, device=device) / fan_in ** 0.5).to(dtype)


def build(out_dir: str | pathlib.Path, shape: MixtralShape, device: str = "cpu",
          dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> pathlib.Path:
    """Write the checkpoint to `out_dir` (one layer's tensors in memory at a time); returns it."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    H = shape.hidden_size
    shards = [{"model.embed_tokens.weight": (shape.vocab_size, H)}]
    shards += [layer_shapes(shape, layer) for layer in range(shape.num_hidden_layers)]
    shards.append({"model.norm.weight": (H,), "lm_head.weight": (shape.vocab_size, H)})
    weight_map, total_bytes = {}, 0
    for index, shapes in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _draw(name, size, generator, device, dtype).cpu() for name, size in shapes.items()}
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= {name: file_name for name in tensors}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
        **{field.name: getattr(shape, field.name) for field in dataclasses.fields(shape)},
        "head_dim": shape.head_dim, "rms_norm_eps": 1e-5, "sliding_window": None,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch."),
        "attention_dropout": 0.0, "output_router_logits": False, "router_jitter_noise": 0.0, "use_cache": True,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir


def weight_bytes_per_step(shape: MixtralShape, batch: int, element_size: int) -> float:
    """Weight bytes one decode step of `batch` sequences must read at least: every dense weight
    (attention, norms, gates, final norm, lm_head), `batch` embedding rows, and the experts the
    step routes to. Experts hit: exactly top_k at batch 1; for a batch, the expectation under
    uniform routing, E * (1 - (1 - k/E)^batch) per layer (a random gate routes about uniformly).
    KV-cache reads (a few MB at these lengths) are left out: this is a floor."""
    H, I, E, k = shape.hidden_size, shape.intermediate_size, shape.num_local_experts, shape.num_experts_per_tok
    per_layer = layer_shapes(shape, 0)
    dense = sum(torch.Size(s).numel() for name, s in per_layer.items() if ".experts." not in name)
    experts_hit = k if batch == 1 else E * (1 - (1 - k / E) ** batch)
    per_step = shape.num_hidden_layers * (dense + experts_hit * 3 * H * I)
    per_step += H + shape.vocab_size * H + batch * H
    return float(per_step * element_size)
