"""A decode step's attention half of each layer in one threaded C call (kernels/decode_layer.c).

For a step in which every sequence adds one token, on one rank (no TP), fp32 on the CPU, with up to
64 sequences (kernels.WIDE_PASS_ROWS), one call per layer computes

    normed = rmsnorm(hidden, input_layernorm); qkv = normed W_qkv^T; RoPE, cache write, attention
    (decode_attention.c); residual = hidden + attended W_o^T; normed2 = rmsnorm(residual, post_attention_layernorm)

on the stage's compute threads (shardmesh.compute_pool.threads(): the caller and helper pthreads of
the library that sleep between calls), each phase cut by what it writes (rows, output features,
(sequence, KV head)), so a row's result is the same bits on any thread count, alone or in any batch
that takes the same form of the products: they are the bits of what the torch path's models/matmul.linear
computes for that many rows (kernels.Kernel.linear at 1-16 rows, Kernel.linear_wide at 17-64); the
norms differ from torch's by rounding only. Everything else (prompts, prompt chunks mixed in, TP, other
dtypes or devices, no kernels, SHARDMESH_DECODE_LAYER=0 or SHARDMESH_DECODE_ATTENTION=0 for A/B runs)
keeps the torch path (layers.Attention, with decode_attention's kernel where it applies).

Measured (2-core bench machine shared with other work; alternated A/B only): a stage's decode step in
process (bench/stage_parts.py, default shape, 2 compute threads, load 1.2) 11.6 -> 8.9 ms at batch 1
(attention half 2.4 vs 4.8-5.2 for attention + norms; LM head on the team 2.9 vs 3.3-3.4 on Python
threads), 24.2 -> 21.1-21.4 at batch 16 (attention half 5.8-6.4 vs 9.7-9.9); one thread's CPU per
layer (load 8) 253-275 vs 492-530 us at 1 row, 799-1075 vs 1193-1251 at 16, 2465-2674 vs 3091-3146
at 32. End to end (bench/tree_ab.py 1s1e-shm-c2, main vs this) at load 1.0-1.3: batch 1 32.6 -> 28.1
ms/token (1.16x), batch 16 61.6 -> 61.1 (1.01x); at load 3-10 batch 16 1.03-1.21x in 4 runs, batch 1
0.84-1.42x. On a busy host the team may wait for a descheduled helper: team.c then runs alone a while.

A stage (StageModel) gives the kernel its RoPE tables whole (by_position: each sequence's row read at
its position), keeps the step from one decode step to the next while the sequences and their cache
buffers stay the same (DecodeLayerStep.of's previous), and runs its final norm with the same norm
(DecodeLayerStep.norm): on a stage's cold caches each torch op or tensor read saved is microseconds.

Shape legend: S sequences (= N rows, one token each), H hidden, A/G query/KV heads, D head_dim.
"""

import ctypes
import functools

import torch

from shardmesh import compute_pool, kernels
from shardmesh.models.decode_attention import DecodeTable
from shardmesh.models.layers import Attention, RMSNorm, Segment
from shardmesh.models.matmul import KERNEL_ROWS, WIDE_KERNEL_ROWS

UNIT_BYTES = 128 * 1024  # weight bytes per unit of the products (~10 us at one thread's ~13 GB/s)


class LayerWeights(ctypes.Structure):
    """struct shardmesh_decode_weights (decode_layer.c)."""
    _fields_ = [(name, ctypes.c_long) for name in ("H", "A", "G", "D")] + \
               [(name, ctypes.c_void_p) for name in ("input_norm", "qkv", "o", "post_norm")] + \
               [(name, ctypes.c_float) for name in ("input_eps", "post_eps", "scale")]


class StepState(ctypes.Structure):
    """struct shardmesh_decode_step (decode_layer.c)."""
    _fields_ = [("S", ctypes.c_long)] + [(name, ctypes.c_void_p) for name in (
        "table", "cos", "signed_sin", "normed", "qkv", "attended", "scratch", "packed")] + \
        [("scratch_stride", ctypes.c_long), ("unit_bytes", ctypes.c_long), ("threads", ctypes.c_int),
         ("wide", ctypes.c_int), ("by_position", ctypes.c_int)]


@functools.lru_cache(maxsize=None)
def _function():
    """The kernel's ctypes function, or None (no kernels, or SHARDMESH_DECODE_LAYER=0 for A/B runs)."""
    return kernels.switched_function("SHARDMESH_DECODE_LAYER", "shardmesh_decode_layer",
                                     [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3,
                                     ctypes.c_long)


class DecodeLayerWeights:
    """One layer's attention half as the kernel reads it (pointers into the layer's tensors, kept alive)."""

    def __init__(self, input_layernorm: RMSNorm, attention: Attention, post_attention_layernorm: RMSNorm):
        self.tensors = (input_layernorm.weight, attention.qkv_proj.weight, attention.o_proj.weight,
                        post_attention_layernorm.weight)
        self.heads = (attention.num_heads, attention.num_kv_heads, attention.head_dim)
        self.struct = LayerWeights(input_layernorm.weight.shape[0], *self.heads, *(t.data_ptr() for t in self.tensors),
                                   input_layernorm.eps, post_attention_layernorm.eps, attention.scaling)

    @classmethod
    def of(cls, input_layernorm: RMSNorm, attention: Attention, post_attention_layernorm: RMSNorm,
           world_size: int) -> "DecodeLayerWeights | None":
        """None unless one rank holds the whole layer in contiguous fp32 on the CPU (the kernel's case)."""
        weights = (input_layernorm.weight, attention.qkv_proj.weight, attention.o_proj.weight,
                   post_attention_layernorm.weight)
        if world_size != 1 or not kernels.usable(*weights):
            return None
        return cls(input_layernorm, attention, post_attention_layernorm)


class DecodeLayerStep:
    """One step's sequences for the kernel: the decode table, RoPE tables and scratch, shared by every layer.

    workspace: a dict the caller keeps from step to step (StageModel: one per stage), from which the
    scratch tensors are reused while their shape fits (a torch op each less per step). They are read
    and written only inside attention_half's one synchronous C call, so steps that interleave at
    their awaits on one thread may share them."""

    def __init__(self, decode: DecodeTable, cos: torch.Tensor, signed_sin: torch.Tensor,
                 layers: list[DecodeLayerWeights], threads: int, unit_bytes: int = UNIT_BYTES,
                 workspace: dict | None = None, by_position: bool = False):
        S = decode.table.shape[0]
        H, (A, G, D) = layers[0].struct.H, layers[0].heads
        stride = decode.scratch_length  # max(length) + D
        if workspace is not None:  # room for the next SCRATCH_STEP lengths too: the same tensor step after step
            stride = -(-stride // SCRATCH_STEP) * SCRATCH_STEP
        self.layers, self.decode, self.cos, self.signed_sin = layers, decode, cos, signed_sin
        self.normed = _scratch(workspace, "normed", S, H)                    # [S, H]
        self.qkv = _scratch(workspace, "qkv", S, (A + 2 * G) * D)            # [S, (A + 2G) D]
        self.attended = _scratch(workspace, "attended", S, A * D)            # [S, A D]
        self.scratch = _scratch(workspace, "scratch", threads, stride)       # [threads, >= L_max + D]
        wide = S > KERNEL_ROWS[1]
        # the outer-product form's packed rows [max(H, A D), 64], 64-byte aligned: 16 spare floats to shift into alignment
        self.spare = _scratch(workspace, "spare", max(H, A * D) * kernels.WIDE_PASS_ROWS + 16, 1) if wide else None
        packed = self.spare.data_ptr() + 4 * ((-self.spare.data_ptr() // 4) % 16) if wide else None
        self.struct = StepState(S, decode.table.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(),
                                self.normed.data_ptr(), self.qkv.data_ptr(), self.attended.data_ptr(),
                                self.scratch.data_ptr(), packed, stride, unit_bytes, threads, wide, by_position)
        self.shape = (S, H)
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # attention_half's, made once per step

    @classmethod
    def of(cls, segments: list[Segment], decode: DecodeTable | None, cos: torch.Tensor, signed_sin: torch.Tensor,
           layers: list[DecodeLayerWeights | None], threads: int | None = None,
           workspace: dict | None = None, previous: "DecodeLayerStep | None" = None,
           by_position: bool = False) -> "DecodeLayerStep | None":
        """None (the torch path) unless every segment adds one token (decode covers them all, rows
        in order), in a number the kernel's products take (KERNEL_ROWS or WIDE_KERNEL_ROWS), every layer takes the kernel (DecodeLayerWeights.of),
        all have one shape, cos/signed_sin are contiguous fp32, and the kernel is on: [S, D], row s
        the RoPE row of row s; or by_position: [P, D] tables (layers.RotaryTable.covering), row p that
        of position p, P past every sequence's new token (the kernel reads each sequence's row itself).
        threads: the team's size (default: the process's compute threads, shardmesh.compute_pool).
        previous: an earlier step's, no longer in use, returned with this step's cos/signed_sin when
        it was made over this very `decode` (DecodeTable.of reused it: the same sequences), the same
        layers, threads and form of cos/signed_sin, and its scratch still holds the longest sequence's;
        its outputs are reused."""
        threads = threads or compute_pool.threads()
        if (previous is not None and previous.decode is decode and previous.layers is layers
                and previous.struct.threads == threads and decode.scratch_length <= previous.struct.scratch_stride
                and previous.struct.by_position == by_position and _function() is not None
                and _rope_rows(decode, cos, signed_sin, by_position)):
            previous.cos, previous.signed_sin = cos, signed_sin
            previous.struct.cos, previous.struct.signed_sin = cos.data_ptr(), signed_sin.data_ptr()
            return previous
        rows = len(segments)
        if decode is None or len(decode.indices) != rows \
                or not any(low <= rows <= high for low, high in (KERNEL_ROWS, WIDE_KERNEL_ROWS)):
            return None
        if not layers or any(layer is None for layer in layers) or _function() is None:
            return None
        if len({(layer.struct.H, layer.heads) for layer in layers}) != 1 or not _rope_rows(decode, cos, signed_sin,
                                                                                          by_position):
            return None
        if any(segment.offset != i for i, segment in enumerate(segments)):  # one token each: rows 0..S-1
            return None
        return cls(decode, cos, signed_sin, layers, threads, workspace=workspace, by_position=by_position)

    def attention_half(self, index: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index` (of the stage's layers and cache buffers): hidden_states [S, H] -> (residual
        [S, H] = hidden_states + attention output, normed [S, H] = post_attention_layernorm(residual));
        writes each sequence's new key and value into its cache. The two outputs are this step's own
        tensors, written again by its next attention_half call: use them before (a layer does)."""
        if not hidden_states.is_contiguous():
            hidden_states = hidden_states.contiguous()
        assert hidden_states.dtype == torch.float32 and tuple(hidden_states.shape) == self.shape
        if self.outputs is None or hidden_states.data_ptr() in (self.outputs[0].data_ptr(), self.outputs[1].data_ptr()):
            self.outputs = (torch.empty(self.shape, dtype=torch.float32),  # residual [S, H]
                            torch.empty(self.shape, dtype=torch.float32))  # normed [S, H]
        residual, normed = self.outputs
        kernels.calls["decode_layer"] += 1
        kernels.units["team_by_helpers"] += _function()(
            ctypes.addressof(self.layers[index].struct), ctypes.addressof(self.struct), index,
            hidden_states.data_ptr(), residual.data_ptr(), normed.data_ptr())
        return residual, normed

    def norm(self, hidden_states: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """norm(hidden_states) [S, H] (a new tensor) by the kernel's RMSNorm, the one of the attention
        half: torch's result up to rounding. hidden_states [S, H] and norm.weight [H]: contiguous fp32
        on the CPU (the stage's final norm; it checked the weight once)."""
        if not hidden_states.is_contiguous():
            hidden_states = hidden_states.contiguous()
        assert hidden_states.dtype == torch.float32 and tuple(hidden_states.shape) == self.shape
        normed = torch.empty(self.shape, dtype=torch.float32)  # [S, H]
        _norm_function()(self.shape[0], self.shape[1], hidden_states.data_ptr(), norm.weight.data_ptr(), norm.eps,
                         normed.data_ptr())
        return normed


@functools.lru_cache(maxsize=None)
def _norm_function():
    """The kernel's RMSNorm (decode_layer.c's rms_norm_rows) as a ctypes function (the library is
    loaded: a DecodeLayerStep exists)."""
    return kernels.switched_function("SHARDMESH_DECODE_LAYER", "shardmesh_rms_norm",
                                     [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                      ctypes.c_void_p], None)


def _rope_rows(decode: DecodeTable, cos: torch.Tensor, signed_sin: torch.Tensor, by_position: bool) -> bool:
    """Whether cos/signed_sin are contiguous fp32 (by_position: with a row for every position up to the
    longest sequence's new token; [S, D] otherwise is the caller's word)."""
    if not kernels.usable(cos, signed_sin):
        return False
    longest = decode.scratch_length - decode.head_dim  # L_max: positions [0, L_max) are read
    return not by_position or (cos.shape[0] >= longest and signed_sin.shape[0] >= longest)


SCRATCH_STEP = 256  # a workspace's attention scratch grows by this many floats per thread at a time
MAX_WORKSPACE_TENSORS = 16


def _scratch(workspace: dict | None, name: str, rows: int, columns: int) -> torch.Tensor:
    """torch.empty(rows, columns) float32, or the workspace's tensor of that name and shape."""
    if workspace is None:
        return torch.empty(rows, columns, dtype=torch.float32)
    key = (name, rows, columns)
    tensor = workspace.get(key)
    if tensor is None:
        if len(workspace) >= MAX_WORKSPACE_TENSORS:  # batch sizes and lengths come and go: keep the recent ones
            workspace.clear()
        tensor = workspace[key] = torch.empty(rows, columns, dtype=torch.float32)
    return tensor
