"""The MoE block's verbs: `route` (the gate's rule), `dispatch` (group tokens by expert), `combine`
(weighted sum back in token order), and `reference_moe`, the slow obvious version to test them by.

    groups, handle = dispatch(hidden_states, router_logits, top_k)
    outputs = {e: expert_e(x) for e, x in groups.items()}      # anywhere: in process or remote
    hidden_states = combine(outputs, handle)

Routing is Mixtral's (transformers `MixtralTopKRouter`): softmax over all experts in float32, top-k
of the probabilities, the k weights renormalized to sum to 1.

Shape legend: T tokens, H hidden_size, E experts, K experts per token (top_k), n_e tokens of expert e.
"""

import collections
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F


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


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights float32 [T, K], topk_idx int64 [T, K]), Mixtral's rule."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E] (the logits cast first)
    topk_weights, topk_idx = torch.topk(probs, top_k, dim=-1)          # [T, K]
    topk_weights /= topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_idx


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What `combine` needs to undo a `dispatch`. Rows are the T*K (token, expert) pairs sorted by
    expert (stable, so tokens stay in order within an expert)."""

    num_tokens: int                 # T
    hidden_size: int                # H
    dtype: torch.dtype              # of the dispatched hidden_states, and of combine's result
    experts: tuple[int, ...]        # expert ids with at least one token, ascending = order of rows
    counts: tuple[int, ...]         # n_e for each of `experts`
    token_idx: torch.Tensor | None  # int64 [T*K]: the token each row came from (None: T is 1)
    weights: torch.Tensor           # float32 [T*K, 1]: that row's routing weight (a column, to scale rows)
    topk_idx: torch.Tensor          # int64 [T, K]: the experts each token chose (for load statistics)


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


def combine(outputs: dict[int, torch.Tensor], handle: DispatchHandle) -> torch.Tensor:
    """Each token's expert outputs weighted by its routing weights and summed: -> [T, H].

    outputs maps every expert of the dispatch to its unweighted output [n_e, H] (same row order as
    its group). Accumulates in float32, in ascending expert order per token; returns the dispatched
    dtype. Raises ValueError when an expert is missing or has the wrong number of rows (outputs may
    come from the network)."""
    try:
        pieces = [outputs[e] for e in handle.experts]
    except KeyError:
        missing = [e for e in handle.experts if e not in outputs]
        raise ValueError(f"combine: no output for experts {missing}") from None
    for expert, count, piece in zip(handle.experts, handle.counts, pieces):
        if piece.shape != (count, handle.hidden_size):
            raise ValueError(f"combine: expert {expert} returned shape {list(piece.shape)}, "
                             f"expected [{count}, {handle.hidden_size}]")
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
