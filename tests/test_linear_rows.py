"""shardmesh_linear's two forms of the dot-product kernel give each output the same bits: 1-8 rows
take the weight rows in pairs (pair_dots), 9-16 in threes (linear_triple.c, AVX-512 machines), the
rest of a range in pairs. A row computed alone (1 row: pairs) must equal the same row inside any
batch of up to 16, for every remainder of the output count after the threes and with scalar tails
in K; and any cut of the outputs over a team of threads must give linear's bits."""

import pytest
import torch
import torch.nn.functional as F

from shardmesh import kernels

# (K, M): M 1..7 and 64: no three, one, a lone pair after it, a three given back so the pairs come
# out even (M 7 = 3 + 2 + 2), 21 threes + a pair; K 17/40/72/136: scalar tails; 512: the LM head's
SHAPES = [(17, 1), (33, 2), (40, 3), (24, 4), (72, 5), (136, 7), (512, 64), (1024, 9)]


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


@pytest.mark.parametrize("features_in, features_out", SHAPES)
def test_a_row_has_the_same_bits_alone_and_in_any_batch_up_to_16(kernel, features_in, features_out):
    generator = torch.Generator().manual_seed(features_in * 100 + features_out)
    weight = torch.randn(features_out, features_in, generator=generator)  # [M, K]
    x = torch.randn(16, features_in, generator=generator)  # [16, K]
    alone = torch.cat([kernel.linear(x[r : r + 1], weight) for r in range(16)])  # [16, M], 1 row each
    reference = F.linear(x.double(), weight.double())
    assert ((alone.double() - reference).abs().max() / reference.abs().max()).item() <= 2e-6  # test_cpu_kernels'
    for rows in range(1, 17):
        assert torch.equal(kernel.linear(x[:rows], weight), alone[:rows]), rows


@pytest.mark.parametrize("rows", [9, 13, 16])
def test_any_cut_over_the_team_gives_linears_bits(kernel, rows):
    generator = torch.Generator().manual_seed(rows)
    K, M = 40, 203  # unit_bytes 1: 2 outputs a unit (no three); 800: 20 (6 threes + a pair); 4000: 100
    x, weight = torch.randn(rows, K, generator=generator), torch.randn(M, K, generator=generator)
    expected = kernel.linear(x, weight)
    for threads in (1, 2, 3):
        for unit_bytes in (1, 800, 4000, 1 << 22):
            assert torch.equal(kernel.linear_team(x, weight, threads, unit_bytes), expected), (threads, unit_bytes)
