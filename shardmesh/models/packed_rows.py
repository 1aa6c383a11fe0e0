"""PackedRows: an MoE layer's groups (or their outputs) as one tensor, read as {expert: rows}.

`MoEGate.dispatch` (the C kernel's path) packs every expert's tokens back to back, experts
ascending, in one tensor [N, H]; a packed ComputeExperts call sends that tensor as it is and its
answer comes back as one tensor of the same shape (stage_server/packed_groups.py); the C combine
reads the answer's rows where they lie. PackedRows carries that tensor through the ExpertBackend
interface (expert id -> rows [n_e, H]) without cutting it into per-expert views on the way: the
views are made only when a value is read (a backend that handles experts one by one).

Shape legend: n_e rows of expert e, N = sum of n_e, H hidden_size.
"""

import collections.abc

import torch


class PackedRows(collections.abc.Mapping):
    """expert -> rows [n_e, H], the views of `rows` [N, H] in `experts` order (ascending, distinct)
    with `counts` rows each (n_e >= 1, summing to N). Read-only: build a dict to change it."""

    __slots__ = ("rows", "experts", "counts", "_views")

    def __init__(self, rows: torch.Tensor, experts: tuple[int, ...], counts: tuple[int, ...]):
        self.rows, self.experts, self.counts = rows, experts, counts  # [N, H]
        self._views: dict[int, torch.Tensor] | None = None

    def _split(self) -> dict[int, torch.Tensor]:
        if self._views is None:
            pieces = self.rows.split_with_sizes(self.counts) if len(self.counts) > 1 else (self.rows,)
            self._views = dict(zip(self.experts, pieces))
        return self._views

    def __getitem__(self, expert: int) -> torch.Tensor:
        return self._split()[expert]

    def __contains__(self, expert) -> bool:
        return expert in self.experts

    def __iter__(self):
        return iter(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __repr__(self) -> str:
        return f"PackedRows(experts={self.experts}, counts={self.counts}, rows={list(self.rows.shape)})"
