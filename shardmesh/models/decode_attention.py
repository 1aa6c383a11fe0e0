"""Attention of a step's one-token (decode) sequences in one C call per layer (kernels/decode_attention.c).

torch's path (layers.Attention) spends ~45 us per sequence and layer on per-op overhead (cache copy,
views, one SDPA call) for microseconds of arithmetic; the kernel rotates (RoPE) and writes the new keys/values into
each sequence's cache and attends, for every decode sequence of the step at once. `DecodeTable.of` is
built once per step, or kept from the step before for the same sequences (DecodeTable.of's previous; None:
torch for everything); `Attention` gives it each layer's q/k/v. Sequences
with more than one new token (prompts, prompt chunks) keep SDPA. Each sequence's result is computed
alone: it does not depend on what else is in the step. Measured (bench machine, load 2-3): a stage's
attention per step, in process (bench/stage_parts.py), 11.1 -> 7.8 ms at batch 16, 4.5 -> 3.6 at batch 1;
end to end (decode_throughput 1s1e-shm-c2 vs 1s1e-shm-c2-sdpa, load 1.7) 57.5 vs 58.5 ms/token at
batch 16 (1.7%), no difference seen at batch 1.

Shape legend: N new tokens in the step, A query heads, G key/value heads, D head_dim, S sequences.
"""

import ctypes
import functools

import torch

from shardmesh import kernels
from shardmesh.models.layers import Segment

TABLE_COLUMNS = 4  # per decode sequence: packed row, cache buffer address, capacity, length after this step


@functools.lru_cache(maxsize=None)
def _function():
    """The kernel's ctypes function, or None (no kernels, or SHARDMESH_DECODE_ATTENTION=0 for A/B runs)."""
    return kernels.switched_function("SHARDMESH_DECODE_ATTENTION", "shardmesh_decode_attention",
                                     [ctypes.c_long] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 6, None)


class DecodeTable:
    """The step's decode sequences and where their caches are: indices (into the step's segments),
    table int64 [S, TABLE_COLUMNS], and the kernel's scratch for the step (the rotated query and the
    scores of the longest sequence, reused by every layer)."""

    def __init__(self, indices: frozenset[int], table: torch.Tensor, max_length: int, buffers: list[torch.Tensor],
                 head_dim: int):
        self.indices, self.table, self.head_dim = indices, table, head_dim
        self.scratch_length = max_length + head_dim  # L_max + D floats: a call's rotated query and scores
        self._scratch: torch.Tensor | None = None    # [L_max + D], made at the first attend (the decode-layer
                                                     # kernel has scratch of its own)
        self.buffers = buffers  # the table holds their addresses: keep them alive as long as it
        self.whole = False  # every row of its step decodes, row i at offset i (of: then reusable by _reuse)
        self._lengths = None  # a numpy view of the table's lengths column, made at the first reuse

    @classmethod
    def of(cls, segments: list[Segment], buffers: list[torch.Tensor],
           previous: "DecodeTable | None" = None) -> "DecodeTable | None":
        """buffers[i]: segment i's cache [layers, 2, G, capacity, D] (kv_cache.KVCache.reserve).
        None when the kernel is off or unavailable, no segment decodes, or a buffer is not fp32 on the CPU.
        previous: a table of an earlier step, no longer in use, which is updated in place and returned
        when both steps are all one-token sequences over the same buffer objects in the same order
        (the addresses and capacities it holds are then theirs: only the lengths change)."""
        if _function() is None:
            return None
        if previous is not None and previous._reuse(segments, buffers):
            return previous
        picks, picked, rows, longest = [], [], [], 0
        for i, segment in enumerate(segments):  # one pass (it runs every step, on cold caches)
            if segment.num_tokens == 1:
                buffer = buffers[i]
                if not (buffer.is_cpu and buffer.dtype is torch.float32 and buffer.is_contiguous()):  # kernels.usable
                    return None
                length = segment.start_position + 1
                rows.append((segment.offset, buffer.data_ptr(), buffer.shape[3], length))
                picks.append(i)
                picked.append(buffer)
                longest = max(longest, length)
        if not picks:
            return None
        # (one torch op: on a stage's cold caches each op costs more than the Python around it)
        table = cls(frozenset(picks), torch.tensor(rows, dtype=torch.int64), longest, picked, picked[0].shape[4])
        table.whole = len(picks) == len(segments) and all(row[0] == i for i, row in enumerate(rows))
        return table

    def _reuse(self, segments: list[Segment], buffers: list[torch.Tensor]) -> bool:
        """Whether this table (whole: every row of its step a decode, in order) takes this step (the same
        buffers, one token each, in order): then its lengths and scratch length are set for it."""
        kept = self.buffers
        if not self.whole or len(kept) != len(segments):
            return False
        lengths = []
        for i, (segment, buffer) in enumerate(zip(segments, buffers)):  # (segments packed in order: offset i)
            if buffer is not kept[i] or segment.num_tokens != 1:
                return False
            lengths.append(segment.start_position + 1)
        if self._lengths is None:
            self._lengths = self.table.numpy()[:, 3]  # [S]: the lengths column (a view of the table), kept
        self._lengths[:] = lengths
        self.scratch_length = max(lengths) + self.head_dim
        self._scratch = None  # (sized for the lengths: made again at the first attend)
        return True

    def attend(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, scale: float,
               attended: torch.Tensor) -> None:
        """Rotate this layer's new queries and keys of the decode sequences (RoPE), write their keys and
        values into their caches and their attention outputs into attended [N, A, D] (other rows untouched).

        qkv [N, A + 2G, D] before RoPE, cos/signed_sin [N, D] (layers.RotaryEmbedding), all contiguous
        fp32; layer: the index within the stage's cache buffers."""
        num_tokens, A, D = attended.shape
        G = (qkv.shape[1] - A) // 2
        assert qkv.is_contiguous() and cos.is_contiguous() and signed_sin.is_contiguous() and attended.is_contiguous()
        assert qkv.dtype == cos.dtype == signed_sin.dtype == attended.dtype == torch.float32
        assert cos.shape == signed_sin.shape == (num_tokens, D) and qkv.shape[0] == num_tokens
        if self._scratch is None:
            self._scratch = torch.empty(self.scratch_length, dtype=torch.float32)  # [L_max + D]
        kernels.calls["decode_attention"] += 1
        _function()(self.table.shape[0], A, G, D, layer, scale, self.table.data_ptr(), qkv.data_ptr(),
                    cos.data_ptr(), signed_sin.data_ptr(), self._scratch.data_ptr(), attended.data_ptr())
