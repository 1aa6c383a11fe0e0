"""Weights copied onto transparent huge pages (shardmesh.huge_pages) and the expert server's
experts held there: same values, aligned, kept alive by the tensors, and on 2 MiB pages where the
kernel lets a process ask for them."""

import gc
import pathlib

import torch

from shardmesh import huge_pages, kernels
from shardmesh.models.layers import SwiGLUMLP


def huge_pages_offered() -> bool:
    setting = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and ("[always]" in setting.read_text() or "[madvise]" in setting.read_text())


def anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            low, high = (int(part, 16) for part in first.split("-"))
            inside = low <= address < high
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_copies_hold_the_same_values_aligned_and_outlive_the_originals():
    generator = torch.Generator().manual_seed(0)
    originals = [torch.randn(1024, 1024, generator=generator), torch.randn(3, 5, generator=generator).double(),
                 torch.empty(0, 4), torch.randint(0, 100, (7,), generator=generator)]
    expected = [t.clone() for t in originals]
    copies = huge_pages.copy_to_huge_pages(originals)
    del originals
    gc.collect()
    for copy, want in zip(copies, expected):
        assert copy.shape == want.shape and copy.dtype == want.dtype and copy.is_contiguous()
        assert torch.equal(copy, want)
        assert copy.numel() == 0 or copy.data_ptr() % huge_pages.ALIGNMENT == 0
    assert copies[0].data_ptr() % huge_pages.HUGE_PAGE == 0  # the mapping starts on a huge page
    copies[1].add_(1)  # the copies are private, writable memory of their own
    assert torch.equal(copies[1], expected[1] + 1) and torch.equal(copies[0], expected[0])
    if huge_pages_offered():  # 4 MiB of one tensor: at least one whole 2 MiB page of it
        assert anon_huge_kb(copies[0].data_ptr()) >= 2048


def test_an_expert_on_huge_pages_computes_the_same_bits():
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(256, 64, generator=generator), torch.randn(256, 64, generator=generator),
               torch.randn(64, 256, generator=generator)]
    expert = SwiGLUMLP(*weights)
    moved = expert.on_huge_pages()
    assert expert.kernel is not None and moved.kernel is expert.kernel
    assert moved.gate_proj.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert all(torch.equal(a, b) for a, b in zip((moved.gate_proj, moved.up_proj, moved.down_proj), weights))
    x = torch.randn(5, 64, generator=generator)
    assert torch.equal(moved(x), expert(x))
    on_torch = SwiGLUMLP(*(w.double() for w in weights))
    assert on_torch.on_huge_pages() is on_torch  # no kernel: left where it is


def test_the_expert_shard_holds_its_experts_on_huge_pages(mixtral_dir):
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.expert_model import ExpertShard

    assert kernels.kernel() is not None
    shard = ExpertShard(ModelConfig.from_dir(mixtral_dir), [(0, 1), (1, 3)], CheckpointReader(mixtral_dir))
    reader = CheckpointReader(mixtral_dir)
    for layer, expert in shard.experts:
        mlp = shard._mlps[(layer, expert)]
        assert mlp.gate_proj.data_ptr() % huge_pages.HUGE_PAGE == 0
        reference = reader.get(f"model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight", torch.float32)
        assert torch.equal(mlp.gate_proj, reference)
