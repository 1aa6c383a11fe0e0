"""No server reads the whole model: a stage reads exactly its layers (+ embedding / final norm and
head where it should) and never an expert; an expert shard reads exactly its experts."""

import pytest
from safetensors import safe_open

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard
from shardmesh.stage_model import StageModel


def expected_stage_keys(config: ModelConfig, start: int, end: int) -> set[str]:
    keys = set()
    for layer in range(start, end):
        prefix = f"model.layers.{layer}."
        keys |= {f"{prefix}self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"}
        if config.is_moe:
            keys.add(f"{prefix}block_sparse_moe.gate.weight")
        else:
            keys |= {f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    if start == 0:
        keys.add("model.embed_tokens.weight")
    if end == config.num_layers:
        keys.add("model.norm.weight")
        keys.add("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
    return keys


def on_disk_bytes(model_dir, keys) -> int:
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            for key in set(handle.keys()) & set(keys):
                tensor = handle.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("variant, splits", [
    ("mixtral_odd", [(0, 1), (1, 3), (3, 5)]),
    ("mixtral", [(0, 4)]),
    ("llama", [(0, 2), (2, 4)]),
    ("llama_mha", [(0, 1), (1, 2), (2, 3)]),  # tied embeddings: the last stage reads embed_tokens as its head
])
def test_stage_reads_only_its_layers(model_dirs, variant, splits):
    model_dir = model_dirs[variant]
    config = ModelConfig.from_dir(model_dir)
    for start, end in splits:
        reader = CheckpointReader(model_dir)
        StageModel(config, start, end, reader)
        expected = expected_stage_keys(config, start, end)
        assert sorted(reader.tensors_read) == sorted(expected), f"stage [{start}, {end})"
        assert not any(".experts." in key for key in reader.tensors_read)
        assert reader.bytes_read == on_disk_bytes(model_dir, expected)


def test_expert_shard_reads_only_its_experts(mixtral_odd_dir):
    config = ModelConfig.from_dir(mixtral_odd_dir)
    held = [(4, 5), (0, 1), (2, 0), (0, 3)]
    reader = CheckpointReader(mixtral_odd_dir)
    shard = ExpertShard(config, held, reader)
    assert shard.experts == sorted(held)
    assert shard.holds(2, 0) and not shard.holds(2, 1) and not shard.holds(1, 0)
    expected = {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                for layer, e in held for w in ("w1", "w2", "w3")}
    assert sorted(reader.tensors_read) == sorted(expected)
    assert reader.bytes_read == on_disk_bytes(mixtral_odd_dir, expected)


def test_expert_shard_refuses_what_it_cannot_hold(mixtral_dir, llama_dir):
    with pytest.raises(ValueError):
        ExpertShard(ModelConfig.from_dir(mixtral_dir), [(4, 0)], CheckpointReader(mixtral_dir))
    with pytest.raises(ValueError):
        ExpertShard(ModelConfig.from_dir(llama_dir), [(0, 0)], CheckpointReader(llama_dir))
    with pytest.raises(ValueError):
        StageModel(ModelConfig.from_dir(llama_dir), 2, 2, CheckpointReader(llama_dir))
