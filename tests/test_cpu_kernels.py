"""The C kernels (shardmesh/kernels) against torch in float64, the expert server computing with them
through a whole in-process mesh, and their fallback to torch.

Tolerance: 2e-6 of the largest |output|, float64 reference. fp32 accumulation over K <= 1024 terms
errs by ~sqrt(K) * 6e-8 relative (3e-7 to 7e-7 measured here, torch's own F.linear path alike); a
kernel that swaps gate and up, drops a row or a tail element is off by O(1).
"""

import asyncio
import logging

import pytest
import torch
import torch.nn.functional as F

from shardmesh import kernels
from shardmesh.models.layers import SwiGLUMLP

from mesh_helpers import check_against_reference, generate_staggered, local_mesh, topology

TOLERANCE = 2e-6
ROWS = [0, 1, 2, 3, 5, 8, 13, 16, 33, 70]


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


def swiglu_reference(x, gate_proj, up_proj, down_proj):
    """The expert in float64: [n, H] -> [n, H]."""
    x, gate_proj, up_proj, down_proj = (t.double() for t in (x, gate_proj, up_proj, down_proj))
    return F.linear(F.silu(F.linear(x, gate_proj)) * F.linear(x, up_proj), down_proj)


def assert_close(out, reference, what):
    assert out.shape == reference.shape and out.dtype == torch.float32, what
    if reference.numel():
        error = ((out.double() - reference).abs().max() / reference.abs().max()).item()
        assert error <= TOLERANCE, f"{what}: relative error {error:.2e} > {TOLERANCE}"


@pytest.mark.parametrize("hidden, intermediate", [(72, 136), (13, 7), (64, 256)])
def test_expert_ffn_matches_float64(kernel, hidden, intermediate):
    # 72/136/13/7: not multiples of any vector width, so every scalar tail runs
    generator = torch.Generator().manual_seed(hidden)
    gate_proj, up_proj = (torch.randn(intermediate, hidden, generator=generator) * 0.3 for _ in range(2))
    down_proj = torch.randn(hidden, intermediate, generator=generator) * 0.3
    for rows in ROWS:
        x = torch.randn(rows, hidden, generator=generator) * 2  # gate values on both sides of silu's bend
        out = kernel.expert_ffn(x, gate_proj, up_proj, down_proj)
        assert_close(out, swiglu_reference(x, gate_proj, up_proj, down_proj), f"{rows} rows, H {hidden}, I {intermediate}")


@pytest.mark.parametrize("features_in, features_out", [(72, 136), (136, 7), (512, 33)])
def test_linear_matches_float64(kernel, features_in, features_out):
    generator = torch.Generator().manual_seed(features_out)
    weight = torch.randn(features_out, features_in, generator=generator)  # odd counts: a row paired with itself
    for rows in ROWS:
        x = torch.randn(rows, features_in, generator=generator)
        assert_close(kernel.linear(x, weight), F.linear(x.double(), weight.double()), f"{rows} rows")


@pytest.mark.parametrize("features_in, features_out", [(72, 136), (136, 7), (5, 1), (512, 33), (17, 61)])
def test_linear_wide_matches_float64_at_every_row_count(kernel, features_in, features_out):
    # every row count 1..70: 1-4 vectors of 16 rows, a second pass past 64, partly filled vectors;
    # outputs not a multiple of the weight-row blocks (16/12/8/6) run the one-row tail blocks
    generator = torch.Generator().manual_seed(features_in)
    weight = torch.randn(features_out, features_in, generator=generator)
    for rows in range(0, 71):
        x = torch.randn(rows, features_in, generator=generator)
        assert_close(kernel.linear_wide(x, weight), F.linear(x.double(), weight.double()), f"{rows} rows")


def test_linear_wide_long_sums_stay_as_close_as_torch(kernel):
    # K = 4096 (a large model's MLP): summed in one chain the error reached 2e-6 of the largest output
    # (5x torch's 4e-7); in 128-term chunks it stays near torch's
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(64, 4096, generator=generator) * 0.05
    x = torch.randn(33, 4096, generator=generator)
    reference = F.linear(x.double(), weight.double())
    error = ((kernel.linear_wide(x, weight).double() - reference).abs().max() / reference.abs().max()).item()
    assert error <= 1e-6, error


def test_linear_wide_rows_do_not_depend_on_the_batch(kernel):
    # each output sums its products in order k = 0..K-1 in whichever lane, block or pass it lands
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(61, 136, generator=generator)
    x = torch.randn(70, 136, generator=generator)
    whole = kernel.linear_wide(x, weight)
    cuts = [0, 1, 4, 17, 33, 34, 49, 70]
    pieces = torch.cat([kernel.linear_wide(x[a:b].contiguous(), weight) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, pieces)


def test_linear_wide_catches_a_wrong_weight(kernel):
    # the tolerance is tight enough to see one weight changed by 1% (a wrong index or tail would be O(1))
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(40, 72, generator=generator)
    x = torch.randn(33, 72, generator=generator)
    changed = weight.clone()
    changed[39, 71] *= 1.01
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(kernel.linear_wide(x, changed), F.linear(x.double(), weight.double()), "one weight off")


def test_silu_over_its_whole_range(kernel):
    # gate_i = g_i exactly (w1 picks x[:, i + 1]), up_i = 1 (w3 picks x[:, 0] = 1), out[:, i + 1] = silu(g_i):
    # 2 rows of 20 values = 40 gate entries, so the vector path (16 lanes) and the scalar tail both run.
    values = torch.tensor([-200, -88, -80, -79.5, -30, -10, -1, -1e-3, 0, 1e-3, 0.5, 1, 3, 10, 30, 79.5, 80, 88, 200,
                           -0.25])
    count = values.numel()
    x = torch.cat([torch.ones(2, 1), torch.stack([values, values.flip(0)])], dim=1)  # [2, count + 1]
    index = torch.arange(count)
    gate_proj = torch.zeros(count, count + 1)  # [I, H]: row i picks column i + 1
    gate_proj[index, index + 1] = 1
    up_proj = torch.zeros(count, count + 1)
    up_proj[:, 0] = 1
    down_proj = gate_proj.t().contiguous()  # [H, I]: column i lands in row i + 1
    out = kernel.expert_ffn(x, gate_proj, up_proj, down_proj)[:, 1:]
    expected = F.silu(x[:, 1:].double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("hidden, intermediate", [(72, 136), (64, 256)])
def test_expert_rows_do_not_depend_on_the_batch(kernel, hidden, intermediate):
    # The same bits for a row computed whole or in any piece (a group cut over replicas):
    # stage_server/remote_experts.py relies on it, tests/test_expert_failover.py checks it end to end.
    generator = torch.Generator().manual_seed(4)
    weights = [torch.randn(intermediate, hidden, generator=generator), torch.randn(intermediate, hidden, generator=generator),
               torch.randn(hidden, intermediate, generator=generator)]
    x = torch.randn(70, hidden, generator=generator)
    whole = kernel.expert_ffn(x, *weights)
    cuts = [0, 1, 4, 7, 15, 16, 29, 37, 45, 70]
    pieces = torch.cat([kernel.expert_ffn(x[a:b].contiguous(), *weights) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, pieces)


def test_expert_uses_the_kernel_at_every_row_count(kernel):
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(48, 40, generator=generator), torch.randn(48, 40, generator=generator),
               torch.randn(40, 48, generator=generator)]
    expert = SwiGLUMLP(*weights)
    assert expert.kernel is kernel
    for rows in (1, 24, 100):
        before = kernels.calls["expert_ffn"]
        x = torch.randn(rows, 40, generator=generator)
        assert_close(expert(x), swiglu_reference(x, *weights), f"{rows} rows")
        assert kernels.calls["expert_ffn"] - before == 1, rows
    assert SwiGLUMLP(*(w.double() for w in weights)).kernel is None  # float64: torch


def test_dense_linear_uses_the_kernel_inside_kernel_rows(kernel):
    from shardmesh.models import matmul

    low, high = matmul.KERNEL_ROWS
    wide_low, wide_high = matmul.WIDE_KERNEL_ROWS
    assert wide_low == high + 1
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(75, 40, generator=generator)  # [o, i]
    for rows in (low - 1, low, high, wide_low, wide_high, wide_high + 1):
        before = kernels.calls["linear"], kernels.calls["linear_wide"]
        x = torch.randn(rows, 40, generator=generator)
        assert_close(matmul.linear(x, weight), F.linear(x.double(), weight.double()), f"{rows} rows")
        assert kernels.calls["linear"] - before[0] == int(low <= rows <= high), rows
        assert kernels.calls["linear_wide"] - before[1] == int(wide_low <= rows <= wide_high), rows
    before = kernels.calls["linear"]
    x = torch.randn(low, 40, generator=generator)
    strided = weight[:, :20]
    assert_close(matmul.linear(x[:, :20].contiguous(), strided), F.linear(x[:, :20].double(), strided.double()), "strided")
    assert kernels.calls["linear"] == before  # a non-contiguous weight: torch


def test_the_expert_server_computes_with_the_kernel(mixtral_dir, kernel):
    prompts = [[1, 17, 33, 5, 90], [1, 44]]
    before = kernels.calls["expert_ffn_many"]

    async def main():
        async with local_mesh(mixtral_dir, topology([(0, 4)], [list(range(8))])) as mesh:
            return await generate_staggered(mesh.address, prompts, 4)

    results = asyncio.run(asyncio.wait_for(main(), 120))
    check_against_reference(mixtral_dir, prompts, results, 4, "mixtral, experts on the C kernel")
    # 4 layers, every step: each layer's experts in one kernel call (ExpertShard.compute_many)
    assert kernels.calls["expert_ffn_many"] - before >= 4 * 4


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """kernels.kernel() rebuilt under the environment the test sets, then forgotten again."""
    monkeypatch.setenv("SHARDMESH_KERNEL_DIR", str(tmp_path))
    kernels.kernel.cache_clear()
    yield
    kernels.kernel.cache_clear()


def test_no_compiler_falls_back_to_torch(fresh_kernel, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("SHARDMESH_KERNEL_CC", "/bin/false")
    with caplog.at_level(logging.INFO, logger="shardmesh.kernels"):
        assert kernels.kernel() is None
    assert "CPU kernels unavailable" in caplog.text and "use torch" in caplog.text
    assert not list(tmp_path.iterdir())  # no library, no temporary file left
    generator = torch.Generator().manual_seed(2)
    weights = [torch.randn(24, 16, generator=generator), torch.randn(24, 16, generator=generator),
               torch.randn(16, 24, generator=generator)]
    expert = SwiGLUMLP(*weights)
    assert expert.kernel is None
    x = torch.randn(3, 16, generator=generator)
    assert_close(expert(x), swiglu_reference(x, *weights), "torch fallback")


def test_switched_off(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("SHARDMESH_CPU_KERNELS", "0")
    with caplog.at_level(logging.INFO, logger="shardmesh.kernels"):
        assert kernels.kernel() is None
    assert "SHARDMESH_CPU_KERNELS=0" in caplog.text


PROBE = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
         "from shardmesh import kernels; k = kernels.kernel(); print('library', k.path)")


def test_two_processes_compile_into_one_cache_entry_and_a_third_reuses_it(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, SHARDMESH_KERNEL_DIR=str(tmp_path))
    env.pop("SHARDMESH_KERNEL_CC", None)
    env.pop("SHARDMESH_CPU_KERNELS", None)

    def start():
        return subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def finish(process) -> str:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
        return output

    first, second = start(), start()  # both find no library: both compile, each renames a whole file into place
    outputs = [finish(first), finish(second)]
    libraries = list(tmp_path.iterdir())
    assert len(libraries) == 1 and libraries[0].suffix == ".so", libraries  # no temporary file left either
    assert all(f"library {libraries[0]}" in output for output in outputs), outputs
    built_at = libraries[0].stat().st_mtime_ns
    third = finish(start())
    assert f"library {libraries[0]}" in third and "compiled" not in third, third
    assert libraries[0].stat().st_mtime_ns == built_at
