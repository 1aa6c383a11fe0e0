"""models.matmul.linear: the same result as F.linear for every row count, whichever orientation it takes."""

import pytest
import torch
import torch.nn.functional as F

from shardmesh.models import matmul


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 16, 33, 64, 65, 200])
def test_linear_matches_f_linear(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=generator)   # [o, i]
    inputs = torch.randn(rows, 40, generator=generator)  # [n, i]
    result = matmul.linear(inputs, weight)
    assert result.shape == (rows, 96) and result.is_contiguous()
    torch.testing.assert_close(result, F.linear(inputs, weight), rtol=1e-5, atol=1e-5)


def test_decode_rows_take_the_transposed_product():
    """Only fp32 CPU inputs [n, i] with n inside TRANSPOSED_ROWS go through torch.mm(W, x^T)."""
    low, high = matmul.TRANSPOSED_ROWS
    chosen = [matmul.takes_transposed_product(torch.zeros(rows, 8)) for rows in (1, low - 1, low, high, high + 1)]
    assert chosen == [False, False, True, True, False]
    assert not matmul.takes_transposed_product(torch.zeros(low, 8, dtype=torch.float64))
    assert not matmul.takes_transposed_product(torch.zeros(2, low, 8))
