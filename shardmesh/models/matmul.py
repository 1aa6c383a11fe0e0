"""`linear`: F.linear(x, W) computed in the way that runs fastest on CPU for this many rows.

fp32 on the CPU at 1-16 rows (a decode batch) goes to the C kernel (shardmesh.kernels), which reads
each weight row once for all rows; without the kernel, or at other row counts, `torch_linear`:

For a decode batch (8 to 64 token rows) MKL's sgemm computes x W^T slower than (W x^T)^T: on the
bench machine (the default bench shape, one thread) 10-30% on the attention weights and up to 2x on
the LM head at 8-32 rows. With fewer rows MKL's GEMV-like path wins, with more its blocked GEMM,
so those keep F.linear, as do other devices and dtypes (not measured). Experts (layers.SwiGLUMLP)
have their own kernel. Same products; only the order of the fp32 sums may differ (as between two
batch sizes).

Shape legend: n rows (tokens), i input features, o output features.
"""

import torch
import torch.nn.functional as F

from shardmesh import kernels

TRANSPOSED_ROWS = (8, 64)  # row counts (inclusive) that take (W x^T)^T
# Row counts (inclusive) that take the C kernel (shardmesh.kernels): 1.4-2.1x torch at 4-16 rows, 1.03-1.16x
# at 1-2, 0.9-1.0x from 32 (bench/linear_matmul.py: the LM head and attention weights, one thread).
KERNEL_ROWS = (1, 16)


def takes_transposed_product(inputs: torch.Tensor) -> bool:
    """Whether `linear` computes (W x^T)^T for these inputs: fp32 [n, i] on CPU with n in TRANSPOSED_ROWS."""
    return (inputs.dim() == 2 and inputs.device.type == "cpu" and inputs.dtype == torch.float32
            and TRANSPOSED_ROWS[0] <= inputs.shape[0] <= TRANSPOSED_ROWS[1])


def takes_kernel(inputs: torch.Tensor) -> bool:
    """Whether `linear` may give these inputs to the C kernel: [n, i] with n inside KERNEL_ROWS."""
    return inputs.dim() == 2 and KERNEL_ROWS[0] <= inputs.shape[0] <= KERNEL_ROWS[1]


def linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """inputs [n, i], weight [o, i] -> [n, o] (contiguous), no bias."""
    if takes_kernel(inputs):
        kernel = kernels.for_weights("dense linears", weight)
        if kernel is not None and kernels.usable(inputs):
            return kernel.linear(inputs, weight)
    return torch_linear(inputs, weight)


def torch_linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`linear` without the C kernel: F.linear or (W x^T)^T, whichever is faster for this many rows."""
    if not takes_transposed_product(inputs):
        return F.linear(inputs, weight)
    return torch.mm(weight, inputs.t()).t().contiguous()  # [o, n] -> [n, o]
