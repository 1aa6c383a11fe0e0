"""`linear`: F.linear(x, W) computed in the orientation that runs fastest on CPU for this many rows.

For a decode batch (8 to 64 token rows) MKL's sgemm computes x W^T slower than (W x^T)^T: on the
bench machine (the default bench shape, one thread) 10-30% on the attention weights and up to 2x on
the LM head at 8-32 rows. With fewer rows MKL's GEMV-like path wins, with more its blocked GEMM,
so those keep F.linear, as do other devices and dtypes (not measured). Experts (layers.SwiGLUMLP,
mostly 1-8 rows each) keep F.linear: no gain measured there. Same products; only the order of the
fp32 sums may differ (as between two batch sizes).

Shape legend: n rows (tokens), i input features, o output features.
"""

import torch
import torch.nn.functional as F

TRANSPOSED_ROWS = (8, 64)  # row counts (inclusive) that take (W x^T)^T


def takes_transposed_product(inputs: torch.Tensor) -> bool:
    """Whether `linear` computes (W x^T)^T for these inputs: fp32 [n, i] on CPU with n in TRANSPOSED_ROWS."""
    return (inputs.dim() == 2 and inputs.device.type == "cpu" and inputs.dtype == torch.float32
            and TRANSPOSED_ROWS[0] <= inputs.shape[0] <= TRANSPOSED_ROWS[1])


def linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """inputs [n, i], weight [o, i] -> [n, o] (contiguous), no bias."""
    if not takes_transposed_product(inputs):
        return F.linear(inputs, weight)
    return torch.mm(weight, inputs.t()).t().contiguous()  # [o, n] -> [n, o]
