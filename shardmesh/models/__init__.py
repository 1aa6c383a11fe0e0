"""Model families served. Each family is a short module saying only what differs from the shared
layers (`layers.py`, `moe.py`): its weight names on disk and its feed-forward block.

A family module provides:
    HF_CLASS                       transformers class name (for the test oracle and checkpoint maker only)
    EMBED_TOKENS, FINAL_NORM, LM_HEAD, layer_prefix(layer)   weight names on disk
    load_ffn(config, layer, reader, dtype, group)           ParallelSwiGLUMLP (dense, this TP rank's slice) or MoEGate (MoE)
    load_expert(reader, layer, expert, dtype)               MoE families only: one expert's SwiGLUMLP
"""

from types import ModuleType

from shardmesh.models import llama, mixtral

FAMILIES: dict[str, ModuleType] = {"llama": llama, "mixtral": mixtral}


def get_family(name: str) -> ModuleType:
    """The family module for a `ModelConfig.family` name."""
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not served (served: {sorted(FAMILIES)})")
    return FAMILIES[name]
