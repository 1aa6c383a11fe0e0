"""The MoE block's gate + routing + dispatch and its combine in one C call each (kernels/moe_routing.c),
for fp32 on the CPU: `gate_dispatch` and `combine_rows`, used by models/moe.py's verbs.

Torch's path spends ~60-160 us of per-op overhead per layer (warm caches; 200-400 cold, as in a
stage) on a few kilobytes: gate linear, softmax, topk, sort, index_select, split; then cat, mul,
index_add and the residual add. The kernels do the same work in a few microseconds, and the Python
around them stays small: the routing table lives in ctypes arrays, torch views of it are made only
when asked for (the torch combine, load statistics).

Routing is Mixtral's (models/moe.route): softmax in fp32, top-k, renormalised. Where the top-k set is
ambiguous (an exact tie at the K-th probability, or a NaN) the experts are picked by torch.topk on the
kernel's probabilities, as transformers would pick. The groups are views of one packed tensor [T*K, H]
(experts ascending, tokens in order within an expert): the form a packed ComputeExperts call sends
(stage_server/packed_groups.py), with no copy. Each token is computed alone: its routing and its
combined row do not depend on the batch. Off with SHARDMESH_MOE_KERNEL=0 (A/B runs): moe.py's torch path.

Shape legend: T tokens, H hidden_size, E experts, K experts per token.
"""

import ctypes
import functools

import torch

from shardmesh import kernels

calls = {"dispatch": 0, "combine": 0}  # kernel calls in this process (tests read it)


@functools.lru_cache(maxsize=None)
def _functions():
    """(dispatch, combine, combine of a packed answer) ctypes functions, or None (no kernels, or
    SHARDMESH_MOE_KERNEL=0)."""
    dispatch = kernels.switched_function("SHARDMESH_MOE_KERNEL", "shardmesh_moe_dispatch", [ctypes.c_long] * 4
                                         + [ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 4, ctypes.c_long)
    if dispatch is None:
        return None
    combine = kernels.switched_function("SHARDMESH_MOE_KERNEL", "shardmesh_moe_combine",
                                        [ctypes.c_long] * 3 + [ctypes.c_void_p] * 7, None)
    combine_packed = kernels.switched_function("SHARDMESH_MOE_KERNEL", "shardmesh_moe_combine_packed",
                                               [ctypes.c_long] * 4 + [ctypes.c_void_p] * 7, None)
    return dispatch, combine, combine_packed


def usable(hidden_states: torch.Tensor, gate_weight: torch.Tensor) -> bool:
    """Whether `gate_dispatch` takes these: [T, H] and [E, H], contiguous fp32 on the CPU, kernels on."""
    return (hidden_states.dtype is gate_weight.dtype is torch.float32 and hidden_states.is_cpu and gate_weight.is_cpu
            and hidden_states.dim() == 2 and hidden_states.is_contiguous() and gate_weight.is_contiguous()
            and _functions() is not None)  # (kernels.usable's checks, in fewer steps: this runs every layer)


class KernelRouting:
    """One dispatch's routing as the kernel wrote it: `table`, ctypes int64 (moe_routing.c: counts [E] |
    offsets [E] | topk_idx [T, K] | token_experts [T, K] | token_rows [T, K] | row_tokens [T*K]) and
    `floats`, ctypes float32 (weights [T*K], each packed row's routing weight | probs [T, E]); `addresses`:
    where the kernels' arguments lie in them (probs, offsets, token_experts, token_rows)."""

    __slots__ = ("table", "floats", "num_tokens", "num_experts", "top_k", "addresses")

    def __init__(self, num_tokens: int, num_experts: int, top_k: int):
        self.num_tokens, self.num_experts, self.top_k = num_tokens, num_experts, top_k
        self.table = (ctypes.c_int64 * (2 * num_experts + 4 * num_tokens * top_k))()
        self.floats = (ctypes.c_float * (num_tokens * (top_k + num_experts)))()
        base, rows = ctypes.addressof(self.table), num_tokens * top_k
        self.addresses = (ctypes.addressof(self.floats) + 4 * rows, base + 8 * num_experts,
                          base + 8 * (2 * num_experts + rows), base + 8 * (2 * num_experts + 2 * rows))

    def _ints(self, start: int, count: int) -> torch.Tensor:
        if not count:  # (frombuffer refuses a count of 0)
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(self.table, dtype=torch.int64, offset=8 * start, count=count)

    def _floats(self, start: int, count: int) -> torch.Tensor:
        if not count:
            return torch.empty(0, dtype=torch.float32)
        return torch.frombuffer(self.floats, dtype=torch.float32, offset=4 * start, count=count)

    def counts(self) -> list[int]:
        return self.table[:self.num_experts]

    def topk_idx(self) -> torch.Tensor:
        """int64 [T, K]: the experts each token chose, by descending probability."""
        return self._ints(2 * self.num_experts, self.num_tokens * self.top_k).view(self.num_tokens, self.top_k)

    def row_tokens(self) -> torch.Tensor:
        """int64 [T*K]: the token of each packed row."""
        return self._ints(2 * self.num_experts + 3 * self.num_tokens * self.top_k, self.num_tokens * self.top_k)

    def weights(self) -> torch.Tensor:
        """float32 [T*K, 1]: each packed row's routing weight."""
        count = self.num_tokens * self.top_k
        return self._floats(0, count).view(count, 1)

    def probs(self) -> torch.Tensor:
        """float32 [T, E]: the softmax of the gate's logits."""
        return self._floats(self.num_tokens * self.top_k, self.num_tokens * self.num_experts).view(
            self.num_tokens, self.num_experts)


def gate_dispatch(hidden_states: torch.Tensor, gate_weight: torch.Tensor, top_k: int,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, KernelRouting]:
    """hidden_states [T, H], gate_weight [E, H] (both `usable`) -> (packed float32 [T*K, H]: each
    expert's tokens in token order, experts ascending; routing). out: where to write packed (float32
    [T*K, H], contiguous, on the CPU), or None: a new tensor."""
    num_tokens, hidden = hidden_states.shape
    num_experts = gate_weight.shape[0]
    assert 0 < top_k <= num_experts, (top_k, num_experts)
    routing = KernelRouting(num_tokens, num_experts, top_k)
    if out is None:
        packed = torch.empty(num_tokens * top_k, hidden, dtype=torch.float32)  # [T*K, H]
    else:
        check_packed(out, num_tokens * top_k, hidden)
        packed = out
    route(routing, hidden, hidden_states.data_ptr(), gate_weight.data_ptr(), packed.data_ptr())
    return packed, routing


def check_packed(out: torch.Tensor, rows: int, hidden: int) -> None:
    """AssertionError unless `out` can take a dispatch's packed rows: float32 [rows, hidden] contiguous on the CPU."""
    assert out.shape == (rows, hidden) and out.dtype is torch.float32 and out.is_cpu \
        and out.is_contiguous(), (out.shape, out.dtype, out.device)


def route(routing: KernelRouting, hidden: int, hidden_states: int, gate_weight: int, packed: int) -> None:
    """The dispatch kernel into `routing` (its T, E, K): hidden_states [T, H], gate_weight [E, H] and
    packed [T*K, H] given by address (float32, contiguous: the caller checked)."""
    dispatch = _functions()[0]
    num_tokens, num_experts, top_k = routing.num_tokens, routing.num_experts, routing.top_k
    table, floats, probs = routing.table, routing.floats, routing.addresses[0]
    calls["dispatch"] += 1
    if num_tokens and dispatch(num_tokens, hidden, num_experts, top_k, hidden_states, gate_weight, 0, probs, table,
                               floats, packed):
        # an ambiguous set: torch.topk picks (as transformers does), the kernel gathers
        routing.topk_idx().copy_(torch.topk(routing.probs(), top_k, dim=-1).indices)
        dispatch(num_tokens, hidden, num_experts, top_k, hidden_states, gate_weight, 1, probs, table, floats, packed)


def combine_rows(outputs: list[torch.Tensor], experts: tuple[int, ...], routing: KernelRouting,
                 residual: torch.Tensor | None) -> torch.Tensor:
    """[T, H] float32: residual (if given: [T, H] contiguous fp32 on the CPU) + each token's expert
    outputs weighted and summed in ascending expert order (torch's combine: the same bits). outputs[i]:
    expert experts[i]'s rows [n_e, H], contiguous fp32 on the CPU (the caller checked)."""
    addresses = (ctypes.c_void_p * routing.num_experts)()
    for expert, output in zip(experts, outputs):
        addresses[expert] = output.data_ptr()
    hidden = outputs[0].shape[1]
    out = _combine_out(routing, hidden, residual)  # [T, H]
    _, offsets, token_experts, token_rows = routing.addresses
    calls["combine"] += 1
    _functions()[1](routing.num_tokens, hidden, routing.top_k, addresses, offsets, token_experts, token_rows,
                    routing.floats, residual.data_ptr() if residual is not None else None, out.data_ptr())
    return out


def combine_packed(rows: torch.Tensor, routing: KernelRouting, residual: torch.Tensor | None) -> torch.Tensor:
    """combine_rows of the experts' outputs as they lie in one tensor rows [T*K, H] (contiguous fp32 on
    the CPU, the caller checked), each expert's at its packed rows (the routing's offsets): a packed
    answer read in place, with no per-expert views."""
    out = _combine_out(routing, rows.shape[1], residual)  # [T, H]
    combine_packed_into(routing, rows.shape[1], rows.data_ptr(), residual.data_ptr() if residual is not None else None,
                        out.data_ptr())
    return out


def combine_packed_into(routing: KernelRouting, hidden: int, rows: int, residual: int | None, out: int) -> None:
    """The combine kernel of a packed answer rows [T*K, H] (+ residual [T, H], or None) into out [T, H],
    all given by address (float32, contiguous: the caller checked)."""
    _, offsets, token_experts, token_rows = routing.addresses
    calls["combine"] += 1
    _functions()[2](routing.num_tokens, hidden, routing.num_experts, routing.top_k, rows, offsets, token_experts,
                    token_rows, routing.floats, residual, out)


def _combine_out(routing: KernelRouting, hidden: int, residual: torch.Tensor | None) -> torch.Tensor:
    """A new [T, H] float32 for a combine (residual, when given, checked to be [T, H])."""
    num_tokens = routing.num_tokens
    assert residual is None or residual.shape == (num_tokens, hidden), (residual.shape, num_tokens, hidden)
    return torch.empty(num_tokens, hidden, dtype=torch.float32)
