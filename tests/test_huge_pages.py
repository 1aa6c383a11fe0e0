"""Weights copied into huge pages (shardmesh.huge_pages): the same bytes, aligned, on 2 MiB pages
where the kernel grants them, and the same logits and expert outputs bit for bit, for a stage's
weights and an expert server's experts; off by switch, for tensors not on the CPU, or under 2 MiB."""

import asyncio
import gc
import pathlib

import pytest
import torch

from shardmesh import huge_pages
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard, LocalExperts
from shardmesh.models.layers import SwiGLUMLP
from shardmesh.stage_model import StageBatch, StageModel


@pytest.fixture
def switch(monkeypatch):
    """switch(on): SHARDMESH_HUGE_PAGES for the next calls."""
    def set_to(on: bool):
        monkeypatch.setenv("SHARDMESH_HUGE_PAGES", "1" if on else "0")
        huge_pages._madvise.cache_clear()
    yield set_to
    monkeypatch.delenv("SHARDMESH_HUGE_PAGES")
    huge_pages._madvise.cache_clear()


def anon_huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            low, high = (int(part, 16) for part in first.split("-"))
            inside = low <= address < high
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_copies_hold_the_same_bytes_aligned(switch):
    switch(True)
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(700, 513, generator=generator), torch.randn(3, generator=generator),
               torch.randint(0, 9, (5, 7), generator=generator), torch.randn(2048, 1024, generator=generator)]
    copies = huge_pages.to_huge_pages(tensors)
    for tensor, copy in zip(tensors, copies):
        assert copy.dtype == tensor.dtype and copy.shape == tensor.shape and copy.is_contiguous()
        assert torch.equal(copy, tensor) and copy.data_ptr() != tensor.data_ptr()
        assert copy.data_ptr() % huge_pages.ALIGNMENT == 0
    assert copies[0].data_ptr() % huge_pages.HUGE_PAGE == 0  # the region starts on a huge page
    if pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().find("[never]") < 0:
        assert anon_huge_kb(copies[3].data_ptr()) >= 2048  # the region holds >= 1 huge page (THP "madvise"/"always")


def test_huge_pages_after_malloc_raised_its_mapping_threshold(switch):
    """A freed 20 MiB block (malloc had mapped it) raises glibc's mapping threshold to 20 MiB; an
    18 MiB block is then taken from the heap, touched and freed. A region of 8 MiB from malloc would
    reuse those touched small pages: the region must be a fresh mapping, on huge pages all the same."""
    switch(True)
    source = torch.randn(1536, 1024)  # 6 MiB
    big = torch.ones(20 << 18)
    del big
    warm = torch.ones(18 << 18)
    del warm
    copy = huge_pages.to_huge_pages([source])[0]
    gc.collect()  # the copy alone keeps the region's mapping alive
    assert torch.equal(copy, source)
    if pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().find("[never]") < 0:
        assert anon_huge_kb(copy.data_ptr()) == 6144


def test_off_switch_other_devices_and_small_sets_keep_the_tensors(switch):
    tensors = [torch.randn(1024, 1024)]  # 4 MiB
    switch(False)
    assert huge_pages.to_huge_pages(tensors) is tensors
    switch(True)
    on_meta = [torch.empty(1024, 1024, device="meta")]
    assert huge_pages.to_huge_pages(on_meta) is on_meta
    small = [torch.randn(500, 1000)]  # under 2 MiB: no whole huge page to gain
    assert huge_pages.to_huge_pages(small) is small
    assert huge_pages.to_huge_pages(tensors) is not tensors


def test_stage_logits_are_bit_identical_with_and_without(make_model_dir, switch):
    # the "mixtral" test shape with a 12000-token vocabulary: an LM head of 3 MiB, so a huge page's worth
    mixtral_dir = make_model_dir("mixtral", vocab_size=12000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    config = ModelConfig.from_dir(mixtral_dir)
    experts = LocalExperts([ExpertShard(config, [(layer, e) for layer in range(config.num_layers)
                                                 for e in range(config.num_experts)], CheckpointReader(mixtral_dir))])

    async def decode(stage: StageModel) -> list[torch.Tensor]:
        logits = [await stage.forward(StageBatch([1, 2], [0, 0], [5, 3], torch.tensor([1, 5, 9, 13, 17, 1, 6, 11])),
                                      experts)]
        for step in range(3):
            tokens = logits[-1].argmax(-1)
            logits.append(await stage.forward(StageBatch([1, 2], [5 + step, 3 + step], [1, 1], tokens), experts))
        return logits

    switch(False)
    plain = StageModel(config, 0, config.num_layers, CheckpointReader(mixtral_dir))
    switch(True)
    huge = StageModel(config, 0, config.num_layers, CheckpointReader(mixtral_dir))
    assert huge.layers[0].self_attn.qkv_proj.weight.data_ptr() % huge_pages.HUGE_PAGE == 0  # moved: the region's first
    for ours, theirs in zip(asyncio.run(decode(huge)), asyncio.run(decode(plain))):
        assert torch.equal(ours, theirs)


def test_expert_outputs_are_bit_identical_with_and_without(make_model_dir, switch):
    # experts of 256 x 768 x 3 fp32 = 2.25 MiB: one whole huge page each
    model_dir = make_model_dir("mixtral", vocab_size=64, hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=2)
    config = ModelConfig.from_dir(model_dir)
    switch(False)
    plain = ExpertShard(config, [(0, 0), (0, 1)], CheckpointReader(model_dir))
    switch(True)
    huge = ExpertShard(config, [(0, 0), (0, 1)], CheckpointReader(model_dir))
    hidden_states = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(3))  # [n, H]
    for expert in (0, 1):
        assert plain._mlps[(0, expert)].gate_proj.data_ptr() % huge_pages.HUGE_PAGE != 0  # off: where it was loaded
        assert huge._mlps[(0, expert)].gate_proj.data_ptr() % huge_pages.HUGE_PAGE == 0  # moved
        assert torch.equal(huge.compute(0, expert, hidden_states), plain.compute(0, expert, hidden_states))
        assert torch.equal(huge.compute_many([(0, expert, hidden_states)])[0], plain.compute(0, expert, hidden_states))


def test_an_expert_moves_only_when_its_kernel_streams_it_and_a_page_is_gained(switch):
    switch(True)
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(1024, 512, generator=generator), torch.randn(1024, 512, generator=generator),
               torch.randn(512, 1024, generator=generator)]  # 6 MiB
    expert = SwiGLUMLP(*weights)
    moved = expert.on_huge_pages()
    assert expert.kernel is not None and moved.kernel is expert.kernel
    assert moved.gate_proj.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert all(torch.equal(a, b) for a, b in zip((moved.gate_proj, moved.up_proj, moved.down_proj), weights))
    x = torch.randn(5, 512, generator=generator)
    assert torch.equal(moved(x), expert(x))
    on_torch = SwiGLUMLP(*(w.double() for w in weights))
    assert on_torch.on_huge_pages() is on_torch  # no kernel: left where it is
    small = SwiGLUMLP(*(w[:64].contiguous() if i < 2 else w[:, :64].contiguous() for i, w in enumerate(weights)))
    assert small.on_huge_pages() is small  # 384 KiB: no whole huge page to gain
