"""shardmesh_linear's forms of the dot-product kernel give each output the same bits: 1-8 rows
take the weight rows in pairs (pair_dots), 9-16 in threes (linear_triple.c, AVX-512 machines), the
rest of a range in pairs; on AVX2 from 2 rows register tiles of 2-3 weight rows by up to 6 rows
(linear_tiles.c), also an expert's activations. A row computed alone (1 row: pairs) must equal the
same row inside any batch of up to 16, for every remainder of the output count after the threes and
with scalar tails in K; shardmesh_linear must equal shardmesh_linear_pairs (every row count by
pair_dots) bit for bit; and any cut of the outputs over a team of threads must give linear's bits."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

from shardmesh import kernels

# (K, M): M 1..7 and 64: no three, one, a lone pair after it, a three given back so the pairs come
# out even (M 7 = 3 + 2 + 2), 21 threes + a pair; K 17/40/72/136: scalar tails; 512: the LM head's;
# K 7 (all tail), 13, 100, 1029 and M 13, 22 for AVX2's tiles (threes, a pair, a lone row with itself)
SHAPES = [(17, 1), (33, 2), (40, 3), (24, 4), (72, 5), (136, 7), (512, 64), (1024, 9), (7, 5), (13, 1), (100, 13),
          (512, 22), (1029, 5)]


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


def linear_pairs(kernel, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """shardmesh_linear_pairs: x [n, K] W [M, K]^T -> [n, M] by pair_dots at every row count."""
    function = kernel.library.shardmesh_linear_pairs
    function.argtypes, function.restype = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 3, None
    out = torch.empty(x.shape[0], weight.shape[0])
    function(x.shape[0], x.shape[1], weight.shape[0], x.data_ptr(), weight.data_ptr(), out.data_ptr())
    return out


@pytest.mark.parametrize("features_in, features_out", SHAPES)
def test_a_row_has_pair_dots_bits_alone_and_in_any_batch_up_to_17(kernel, features_in, features_out):
    generator = torch.Generator().manual_seed(features_in * 100 + features_out)
    weight = torch.randn(features_out, features_in, generator=generator)  # [M, K]
    x = torch.randn(17, features_in, generator=generator)  # [17, K]
    alone = torch.cat([kernel.linear(x[r : r + 1], weight) for r in range(17)])  # [17, M], 1 row each
    reference = F.linear(x.double(), weight.double())
    assert ((alone.double() - reference).abs().max() / reference.abs().max()).item() <= 2e-6  # test_cpu_kernels'
    for rows in range(1, 18):
        got = kernel.linear(x[:rows], weight).view(torch.int32)  # bits
        assert torch.equal(got, alone[:rows].view(torch.int32)), rows
        assert torch.equal(got, linear_pairs(kernel, x[:rows], weight).view(torch.int32)), rows


@pytest.mark.parametrize("rows", [9, 13, 16])
def test_any_cut_over_the_team_gives_linears_bits(kernel, rows):
    generator = torch.Generator().manual_seed(rows)
    K, M = 40, 203  # unit_bytes 1: 2 outputs a unit (no three); 800: 20 (6 threes + a pair); 4000: 100
    x, weight = torch.randn(rows, K, generator=generator), torch.randn(M, K, generator=generator)
    expected = kernel.linear(x, weight)
    for threads in (1, 2, 3):
        for unit_bytes in (1, 800, 4000, 1 << 22):
            assert torch.equal(kernel.linear_team(x, weight, threads, unit_bytes), expected), (threads, unit_bytes)


@pytest.mark.parametrize("hidden, intermediate", [(13, 7), (40, 21), (512, 1024)])
def test_expert_rows_have_their_one_row_bits_at_every_row_count(kernel, hidden, intermediate):
    generator = torch.Generator().manual_seed(hidden + intermediate)
    w1, w3 = (torch.randn(intermediate, hidden, generator=generator) * 0.1 for _ in range(2))  # [I, H]
    w2 = torch.randn(hidden, intermediate, generator=generator) * 0.1  # [H, I]
    x = torch.randn(17, hidden, generator=generator) * 2  # [17, H]
    alone = torch.cat([kernel.expert_ffn(x[r : r + 1], w1, w3, w2) for r in range(17)])  # [17, H]: pair_dots
    for rows in range(2, 18):
        assert torch.equal(kernel.expert_ffn(x[:rows], w1, w3, w2), alone[:rows]), rows
