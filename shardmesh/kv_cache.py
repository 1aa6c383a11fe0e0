"""Per-sequence KV cache of one stage's layers, with staged writes so that a step is atomic.

Each sequence owns one buffer [num_layers, 2, G, capacity, D] (keys and values of every layer of
the stage) and a committed length. A step `reserve`s room, writes its new keys/values past the
committed length, and `commit`s the new length only when the whole step succeeded. A failed step
leaves the committed prefix untouched: what it wrote past the end is ignored and overwritten next
time. Buffers grow by doubling (up to max_length), so appending one token is O(1) amortized.

Shape legend: G key/value heads, D head_dim.
"""

import torch

MIN_CAPACITY = 16


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self._buffers: dict[int, torch.Tensor] = {}  # sequence id -> [layers, 2, G, capacity, D]
        self._lengths: dict[int, int] = {}           # sequence id -> committed tokens

    def __contains__(self, sequence_id: int) -> bool:
        return sequence_id in self._lengths

    def __len__(self) -> int:
        """Sequences cached."""
        return len(self._lengths)

    def sequence_ids(self) -> list[int]:
        return sorted(self._lengths)

    def length(self, sequence_id: int) -> int:
        """Committed tokens of a sequence (0 if unknown)."""
        return self._lengths.get(sequence_id, 0)

    def cached_tokens(self) -> int:
        return sum(self._lengths.values())

    def reserve(self, sequence_id: int, end: int) -> torch.Tensor:
        """A buffer with room for `end` tokens holding this sequence's committed prefix.

        It is the sequence's own buffer when that is large enough, else a larger copy that only
        `commit` installs. Write new entries at [length, end) of it."""
        assert end <= self.max_length, (end, self.max_length)
        buffer = self._buffers.get(sequence_id)
        if buffer is not None and buffer.shape[3] >= end:
            return buffer
        capacity = MIN_CAPACITY
        while capacity < end:
            capacity *= 2
        capacity = min(capacity, self.max_length)
        grown = torch.empty(self.num_layers, 2, self.num_kv_heads, capacity, self.head_dim,
                            dtype=self.dtype, device=self.device)
        if buffer is not None:
            length = self._lengths[sequence_id]
            grown[:, :, :, :length] = buffer[:, :, :, :length]
        return grown

    def commit(self, sequence_id: int, buffer: torch.Tensor, length: int) -> None:
        """Make `buffer` (from `reserve`) hold this sequence, with `length` valid tokens."""
        assert length >= self._lengths.get(sequence_id, 0), "a commit never shortens a sequence"
        self._buffers[sequence_id] = buffer
        self._lengths[sequence_id] = length

    def free(self, sequence_ids) -> int:
        """Forget these sequences; returns how many were cached (unknown ids are ignored)."""
        freed = 0
        for sequence_id in sequence_ids:
            if self._lengths.pop(sequence_id, None) is not None:
                del self._buffers[sequence_id]
                freed += 1
        return freed
