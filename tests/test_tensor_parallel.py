"""Tensor parallelism inside one stage: T ranks (threads, each its own event loop) == TP=1 == transformers.

Each rank holds 1/T of the heads and of the MLP and AllReduces after o_proj and down_proj (a
ThreadGroup summing in rank order, or real gloo on loopback); MoE stages send each token to the
experts from one rank only. Also: each rank reads only its slice of every sharded tensor.
"""

import asyncio

import pytest
import torch
from safetensors import safe_open

from oracle import assert_logits_close
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.models.parallel import check_tp_shapes
from shardmesh.stage_model import StageBatch, StageModel
from test_model_local import check_against_reference, every_layer, greedy_loop, load_experts, load_stages, make_requests
from tp_helpers import TPStage, gloo_groups, thread_groups

# (variant, stage splits, tp): GQA 4 heads / 2 KV heads at T=4 replicates each KV head on 2 ranks.
CASES = [
    ("llama", [(0, 4)], 2),
    ("llama", [(0, 4)], 4),
    ("llama", [(0, 1), (1, 4)], 2),
    ("llama_mha", [(0, 3)], 4),       # head_dim != hidden / heads, tied embeddings
    ("mixtral", [(0, 4)], 2),
    ("mixtral", [(0, 2), (2, 4)], 4),
]


def run_tp_greedy(model_dir, splits, make_groups, tp: int):
    config = ModelConfig.from_dir(model_dir)
    stages = [TPStage(model_dir, start, end, make_groups(tp)) for start, end in splits]
    experts = load_experts(model_dir, [every_layer(config, range(config.num_experts))] if config.is_moe else None)
    requests = make_requests(config.vocab_size)
    try:
        asyncio.run(greedy_loop(stages, experts, requests))
    finally:
        for stage in stages:
            stage.close()
    assert all(stage.outputs_equal for stage in stages), "ranks of one stage returned different outputs"
    assert all(stage.cached_sequence_ids() == [] for stage in stages)
    return requests


@pytest.mark.parametrize("variant, splits, tp", CASES, ids=[f"{v}-{len(s)}stages-tp{t}" for v, s, t in CASES])
def test_tp_greedy_matches_transformers(model_dirs, variant, splits, tp):
    model_dir = model_dirs[variant]
    requests = run_tp_greedy(model_dir, splits, thread_groups, tp)
    check_against_reference(model_dir, requests, f"{variant} {splits} tp={tp}")


def test_tp_over_gloo_matches_transformers(mixtral_dir):
    """The same with torch.distributed gloo on loopback (one group per rank, formed concurrently)."""
    requests = run_tp_greedy(mixtral_dir, [(0, 4)], gloo_groups, 2)
    check_against_reference(mixtral_dir, requests, "mixtral tp=2 gloo")


@pytest.mark.parametrize("variant, tp", [("llama", 2), ("llama", 4), ("mixtral", 4)])
def test_tp_prefill_equals_tp1(model_dirs, variant, tp):
    """A packed two-sequence prefill: logits of T ranks within 1e-4 relative of one whole stage."""
    model_dir = model_dirs[variant]
    config = ModelConfig.from_dir(model_dir)
    experts = load_experts(model_dir, [every_layer(config, range(config.num_experts))] if config.is_moe else None)
    batch = StageBatch([3, 9], [0, 0], [5, 8], torch.arange(3, 16))
    whole = asyncio.run(load_stages(model_dir, [(0, config.num_layers)])[0].forward(batch, experts))
    stage = TPStage(model_dir, 0, config.num_layers, thread_groups(tp))
    try:
        sharded = asyncio.run(stage.forward(batch, experts))
    finally:
        stage.close()
    assert_logits_close(sharded, whole, context=f"{variant} tp={tp} vs tp=1")
    assert stage.ranks[0].cache.num_kv_heads == max(1, config.num_key_value_heads // tp)


SHARDED = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1}


def disk_shapes(model_dir) -> dict[str, list[int]]:
    shapes = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            shapes.update({key: list(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


@pytest.mark.parametrize("variant, tp", [("llama", 2), ("llama", 4), ("mixtral", 2)])
def test_each_rank_reads_only_its_slice(model_dirs, variant, tp):
    """Bytes counted by the reader: 1/T of every sharded tensor (KV: one head of G when G < T), the
    whole of the replicated ones (norms, MoE gate, embedding, head), and the ranks' slices tile the tensor."""
    model_dir = model_dirs[variant]
    config = ModelConfig.from_dir(model_dir)
    shapes = disk_shapes(model_dir)
    G, T = config.num_key_value_heads, tp
    covered: dict[str, list[tuple[int, int]]] = {}
    for group in thread_groups(tp):
        reader = CheckpointReader(model_dir)
        StageModel(config, 0, config.num_layers, reader, tp=group)
        expected_bytes = 0
        sliced = {key for key, *_ in reader.slices_read}
        for key in reader.tensors_read:
            rows, cols = shapes[key] if len(shapes[key]) == 2 else (shapes[key][0], 1)
            kind = key.split(".")[-2]
            if kind in SHARDED:
                assert key in sliced, f"rank {group.rank} read {key} whole"
                share = 1 / G if kind in ("k_proj", "v_proj") and G < T else 1 / T
                expected_bytes += int(rows * cols * share) * 4
            else:
                assert key not in sliced
                expected_bytes += rows * cols * 4
        assert reader.bytes_read == expected_bytes, f"rank {group.rank}"
        for key, dim, start, end in reader.slices_read:
            covered.setdefault(key, []).append((start, end))
    for key, ranges in covered.items():
        dim = SHARDED[key.split(".")[-2]]
        assert sorted(set(ranges))[0][0] == 0 and max(end for _, end in ranges) == shapes[key][dim], key
    assert len(covered) == config.num_layers * (4 if config.is_moe else 7)


def test_uneven_split_is_refused(llama_dir):
    config = ModelConfig.from_dir(llama_dir)  # 4 heads, 2 KV heads, intermediate 128
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tp 3"):
        check_tp_shapes(config, 3)
    with pytest.raises(ValueError, match="tp 8"):
        StageModel(config, 0, 1, CheckpointReader(llama_dir), tp=thread_groups(8)[0])


def test_get_slice_validates(llama_dir):
    reader = CheckpointReader(llama_dir)
    with pytest.raises(ValueError, match=r"cannot take \[0, 999\) of dim 0"):
        reader.get_slice("model.layers.0.self_attn.q_proj.weight", 0, 0, 999)
    with pytest.raises(KeyError, match="nope"):
        reader.get_slice("nope", 0, 0, 1)
    part = reader.get_slice("model.layers.0.self_attn.o_proj.weight", 1, 16, 32)
    whole = CheckpointReader(llama_dir).get("model.layers.0.self_attn.o_proj.weight")
    assert torch.equal(part, whole[:, 16:32]) and reader.bytes_read == part.numel() * 4
