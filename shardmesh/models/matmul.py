"""`linear`: F.linear(x, W) computed in the way that runs fastest on CPU for this many rows.

fp32 on the CPU at 1-16 rows (a decode batch) goes to the C kernel (shardmesh.kernels), which reads
each weight row once for all rows, at 17-64 rows to its outer-product form (`Kernel.linear_wide`);
without the kernel, or at other row counts, `torch_linear`:

For a decode batch (8 to 64 token rows) MKL's sgemm computes x W^T slower than (W x^T)^T: on the
bench machine (the default bench shape, one thread) 10-30% on the attention weights and up to 2x on
the LM head at 8-32 rows. With fewer rows MKL's GEMV-like path wins, with more its blocked GEMM,
so those keep F.linear, as do other devices and dtypes (not measured). Experts (layers.SwiGLUMLP)
have their own kernel. Same products; only the order of the fp32 sums may differ (as between two
batch sizes).

Shape legend: n rows (tokens), i input features, o output features.
"""

import os

import torch
import torch.nn.functional as F

from shardmesh import kernels

TRANSPOSED_ROWS = (8, 64)  # row counts (inclusive) that take (W x^T)^T
# Row counts (inclusive) that take the C kernel (shardmesh.kernels): 1.4-2.1x torch at 4-16 rows, 1.03-1.16x
# at 1-2, 0.9-1.0x from 32 (bench/linear_matmul.py: the LM head and attention weights, one thread).
KERNEL_ROWS = (1, 16)
# Row counts (inclusive) that take the kernel's outer-product form: at 24-64 rows 1.43-1.71x torch on the LM
# head 32000x512, 1.04-1.25x on 512x512 and 1024x512 (0.93-1.14x on 512x1024), 1.0-1.6x the dot-product
# form (bench/linear_matmul.py, one thread); below 17 rows the dot-product form is as fast or faster.
WIDE_KERNEL_ROWS = (17, 64)
if os.environ.get("SHARDMESH_WIDE_LINEAR", "1") == "0":  # off (A/B benchmarks): 17-64 rows take torch
    WIDE_KERNEL_ROWS = (17, 16)


def takes_transposed_product(inputs: torch.Tensor) -> bool:
    """Whether `linear` computes (W x^T)^T for these inputs: fp32 [n, i] on CPU with n in TRANSPOSED_ROWS."""
    return (inputs.dim() == 2 and inputs.device.type == "cpu" and inputs.dtype == torch.float32
            and TRANSPOSED_ROWS[0] <= inputs.shape[0] <= TRANSPOSED_ROWS[1])


def takes_kernel(inputs: torch.Tensor) -> bool:
    """Whether `linear` may give these inputs to the C kernel: [n, i] with n inside KERNEL_ROWS or
    WIDE_KERNEL_ROWS."""
    return inputs.dim() == 2 and any(low <= inputs.shape[0] <= high for low, high in (KERNEL_ROWS, WIDE_KERNEL_ROWS))


def linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """inputs [n, i], weight [o, i] -> [n, o] (contiguous), no bias."""
    if takes_kernel(inputs):
        kernel = kernels.for_weights("dense linears", weight)
        if kernel is not None and kernels.usable(inputs):
            if inputs.shape[0] >= WIDE_KERNEL_ROWS[0]:
                return kernel.linear_wide(inputs, weight)
            return kernel.linear(inputs, weight)
    return torch_linear(inputs, weight)


def torch_linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`linear` without the C kernel: F.linear or (W x^T)^T, whichever is faster for this many rows."""
    if not takes_transposed_product(inputs):
        return F.linear(inputs, weight)
    return torch.mm(weight, inputs.t()).t().contiguous()  # [o, n] -> [n, o]
