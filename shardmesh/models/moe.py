"""The MoE block's verbs: `route` (the gate's rule), `dispatch` (group tokens by expert), `combine`
(weighted sum back in token order), and `reference_moe`, the slow obvious version to test them by.

    groups, handle = dispatch(hidden_states, router_logits, top_k)
    outputs = {e: expert_e(x) for e, x in groups.items()}      # anywhere: in process or remote
    hidden_states = combine(outputs, handle)

Routing is Mixtral's (transformers `MixtralTopKRouter`): softmax over all experts in float32, top-k
of the probabilities, the k weights renormalized to sum to 1.

A stage calls `MoEGate.dispatch(hidden_states)` (gate + route + dispatch) and `combine(..., residual)`:
for fp32 on the CPU both are one C call (models/moe_kernel.py; SHARDMESH_MOE_KERNEL=0 for torch),
the groups then views of one packed tensor.

Shape legend: T tokens, H hidden_size, E experts, K experts per token (top_k), n_e tokens of expert e.
"""

import collections
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shardmesh.models import moe_kernel
from shardmesh.models.packed_rows import PackedRows


class MoEGate:
    """The router's linear layer: hidden_states [T, H] -> router_logits [T, E] (in the hidden dtype)."""

    def __init__(self, weight: torch.Tensor, top_k: int):
        self.weight = weight  # [E, H]
        self.top_k = top_k

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight)

    def dispatch(self, hidden_states: torch.Tensor,
                 out: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], "DispatchHandle"]:
        """`dispatch(hidden_states, self(hidden_states), top_k)`, in one C call for fp32 on the CPU
        (moe_kernel.gate_dispatch: the groups are then a PackedRows of one packed tensor [T*K, H],
        experts ascending, which packed_groups sends as it is; written into `out` when given: float32
        [T*K, H] contiguous on the CPU, e.g. room in a shared-memory segment; the torch path ignores it)."""
        if not moe_kernel.usable(hidden_states, self.weight):
            return dispatch(hidden_states, self(hidden_states), self.top_k)
        packed, routing = moe_kernel.gate_dispatch(hidden_states, self.weight, self.top_k, out)  # packed [T*K, H]
        counts = routing.counts()
        experts = tuple(e for e, count in enumerate(counts) if count)
        sizes = tuple(counts[e] for e in experts)
        groups = PackedRows(packed, experts, sizes)  # views made only if a backend reads them one by one
        return groups, DispatchHandle(hidden_states.shape[0], hidden_states.shape[1], hidden_states.dtype, experts,
                                      sizes, routing=routing)


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights float32 [T, K], topk_idx int64 [T, K]), Mixtral's rule."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E] (the logits cast first)
    topk_weights, topk_idx = torch.topk(probs, top_k, dim=-1)          # [T, K]
    topk_weights /= topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_idx


class DispatchHandle:
    """What `combine` needs to undo a `dispatch`. Rows are the T*K (token, expert) pairs sorted by
    expert (stable, so tokens stay in order within an expert).

    num_tokens T, hidden_size H; dtype: of the dispatched hidden_states, and of combine's result;
    experts: expert ids with at least one token, ascending = order of rows; counts: n_e for each of
    `experts`; token_idx int64 [T*K]: the token each row came from (None: T is 1, torch's one-token
    path); weights float32 [T*K, 1]: that row's routing weight (a column, to scale rows); topk_idx
    int64 [T, K]: the experts each token chose (for load statistics). With `routing` (the C kernel's,
    MoEGate.dispatch) the last three are views of its table, made when first read."""

    __slots__ = ("num_tokens", "hidden_size", "dtype", "experts", "counts", "_token_idx", "_weights", "_topk_idx",
                 "routing")

    def __init__(self, num_tokens: int, hidden_size: int, dtype: torch.dtype, experts: tuple[int, ...],
                 counts: tuple[int, ...], token_idx: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                 topk_idx: torch.Tensor | None = None, routing: "moe_kernel.KernelRouting | None" = None):
        self.num_tokens, self.hidden_size, self.dtype, self.experts, self.counts = \
            num_tokens, hidden_size, dtype, experts, counts
        self._token_idx, self._weights, self._topk_idx, self.routing = token_idx, weights, topk_idx, routing

    @property
    def token_idx(self) -> torch.Tensor | None:
        if self.routing is not None and self._token_idx is None:
            self._token_idx = self.routing.row_tokens()
        return self._token_idx

    @property
    def weights(self) -> torch.Tensor:
        if self.routing is not None and self._weights is None:
            self._weights = self.routing.weights()
        return self._weights

    @property
    def topk_idx(self) -> torch.Tensor:
        if self.routing is not None and self._topk_idx is None:
            self._topk_idx = self.routing.topk_idx()
        return self._topk_idx


def dispatch(hidden_states: torch.Tensor, router_logits: torch.Tensor,
             top_k: int) -> tuple[dict[int, torch.Tensor], DispatchHandle]:
    """Group tokens by the experts the gate picks for them.

    hidden_states [T, H], router_logits [T, E] -> (groups, handle): groups maps each expert that got
    at least one token to its tokens' hidden_states [n_e, H] (in token order); experts with no
    tokens are absent. A token appears in K groups. The groups are read-only (one token's groups
    may all be `hidden_states` itself)."""
    num_tokens = router_logits.shape[0]
    assert hidden_states.shape[0] == num_tokens, (hidden_states.shape, router_logits.shape)
    topk_weights, topk_idx = route(router_logits, top_k)
    if num_tokens == 1 and top_k <= 2:  # decode at batch 1: each group is the token itself, no index op
        # (combine then sums the K <= 2 weighted rows: the same bits as index_add_ in any order)
        experts = topk_idx.tolist()[0]                                  # K distinct expert ids
        weights = topk_weights.view(top_k, 1)                           # [K, 1]
        if experts != sorted(experts):  # two experts, descending: ascending is the reverse
            experts.reverse()
            weights = weights.flip(0)
        return dict.fromkeys(experts, hidden_states), DispatchHandle(
            1, hidden_states.shape[1], hidden_states.dtype, tuple(experts), (1,) * top_k, None, weights, topk_idx)
    sorted_experts, order = topk_idx.reshape(-1).sort(stable=True)      # [T*K] each
    token_idx = order // top_k                                          # [T*K]
    counts = collections.Counter(sorted_experts.tolist())               # ascending expert ids, as sorted
    rows = hidden_states.index_select(0, token_idx).split(list(counts.values()))  # a tensor [n_e, H] per expert
    groups = dict(zip(counts, rows))
    handle = DispatchHandle(num_tokens, hidden_states.shape[1], hidden_states.dtype, tuple(counts),
                            tuple(counts.values()), token_idx, topk_weights.view(-1, 1).index_select(0, order),
                            topk_idx)
    return groups, handle


def combine(outputs: dict[int, torch.Tensor], handle: DispatchHandle,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's expert outputs weighted by its routing weights and summed: -> [T, H], plus
    `residual` [T, H] (same dtype) when given.

    outputs maps every expert of the dispatch to its unweighted output [n_e, H] (same row order as
    its group). Accumulates in float32, in ascending expert order per token; returns the dispatched
    dtype. Raises ValueError when an expert is missing or has the wrong number of rows (outputs may
    come from the network). A handle of the C kernel (MoEGate.dispatch) with fp32 CPU outputs is
    combined by the kernel, residual included, in one pass: the same bits as torch's path; outputs
    that are a PackedRows of those experts and counts (a packed answer) go to it as one tensor."""
    if (handle.routing is not None and type(outputs) is PackedRows and handle.experts and outputs.experts == handle.experts
            and outputs.counts == handle.counts and _kernel_takes_packed(outputs.rows, handle, residual)):
        return moe_kernel.combine_packed(outputs.rows, handle.routing, residual)
    try:
        pieces = [outputs[e] for e in handle.experts]
    except KeyError:
        missing = [e for e in handle.experts if e not in outputs]
        raise ValueError(f"combine: no output for experts {missing}") from None
    for expert, count, piece in zip(handle.experts, handle.counts, pieces):
        if piece.shape != (count, handle.hidden_size):
            raise ValueError(f"combine: expert {expert} returned shape {list(piece.shape)}, "
                             f"expected [{count}, {handle.hidden_size}]")
    if handle.routing is not None and pieces and kernels_take(pieces, residual):
        pieces = [p if p.is_contiguous() else p.contiguous() for p in pieces]
        return moe_kernel.combine_rows(pieces, handle.experts, handle.routing, residual)
    combined = _combine_torch(pieces, handle)
    return combined if residual is None else residual + combined


def kernels_take(pieces: list[torch.Tensor], residual: torch.Tensor | None) -> bool:
    """Whether the C combine takes these expert outputs and residual: fp32 on the CPU."""
    tensors = pieces if residual is None else [*pieces, residual]
    return all(t.dtype is torch.float32 and t.is_cpu for t in tensors) and (
        residual is None or residual.is_contiguous())


def _kernel_takes_packed(rows: torch.Tensor, handle: DispatchHandle, residual: torch.Tensor | None) -> bool:
    """Whether the C combine takes this packed answer [N, H] as it is: every row of the dispatch, fp32
    contiguous on the CPU (as is the residual, if any)."""
    return (rows.dtype is torch.float32 and rows.is_cpu and rows.is_contiguous() and rows.dim() == 2
            and rows.shape[0] == handle.routing.num_tokens * handle.routing.top_k and rows.shape[1] == handle.hidden_size
            and (residual is None or (residual.dtype is torch.float32 and residual.is_cpu and residual.is_contiguous())))


def _combine_torch(pieces: list[torch.Tensor], handle: DispatchHandle) -> torch.Tensor:
    """combine's torch path: pieces [n_e, H] in handle.experts' order (checked) -> [T, H] handle.dtype."""
    device = handle.weights.device
    if not pieces:
        return torch.zeros(handle.num_tokens, handle.hidden_size, dtype=handle.dtype, device=device)
    if any(p.dtype != torch.float32 or p.device != device for p in pieces):
        pieces = [p.to(device, torch.float32) for p in pieces]
    rows = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()  # [T*K, H] float32, our own copy
    rows.mul_(handle.weights)
    if handle.token_idx is None:  # one token: its K weighted rows summed (the same sums as index_add_ from 0)
        return rows.sum(0, keepdim=True).to(handle.dtype)
    combined = torch.zeros(handle.num_tokens, handle.hidden_size, dtype=torch.float32, device=device)  # [T, H]
    return combined.index_add_(0, handle.token_idx, rows).to(handle.dtype)


def reference_moe(hidden_states: torch.Tensor, router_logits: torch.Tensor, top_k: int,
                  expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The slow obvious MoE block: for each token, for each of its top-k experts, add weight * expert(x).

    expert(e, x [n, H]) -> [n, H]. Returns [T, H] in hidden_states' dtype. For tests only."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    result = torch.zeros(hidden_states.shape, dtype=torch.float32)
    for t in range(hidden_states.shape[0]):
        weights, chosen = torch.topk(probs[t], top_k)
        weights = weights / weights.sum()
        for weight, e in zip(weights.tolist(), chosen.tolist()):
            result[t] += weight * expert(e, hidden_states[t:t + 1])[0].float()
    return result.to(hidden_states.dtype)
