"""GreedyHead: a step's greedy tokens from the LM head without computing every logit.

When every sequence of a step samples greedily, the last stage needs only each row's argmax of
logits = hidden_states lm_head^T. GreedyHead gets it from an int8 copy of the head (a scale per
vocab row) against the rows in two int8 levels on AMX (a quarter of the bytes of the fp32 head,
and AMX's exact int8 products), a rigorous bound on that product's error, and the fp32 logits of
the few columns the bound leaves open, computed by the same C dot product as the full head
(shardmesh/kernels/lm_head_amx.c says why the token is always the one numpy's argmax gives on the
full head's fp32 logits, and derives the bound). It answers None, and the caller takes the full
head, whenever a premise fails: rows outside 1-16 (the full head would not take the C kernel's
dot-product form), hidden size over 1040, hidden states not finite, all zero or too large, a
product not finite, or more than 64 candidates in a row.

Memory: the copy adds about V H bytes to the last stage (16.4 MB for 32000 x 512), in huge pages,
and 12 bytes a vocab row. On where the library has AMX-INT8 code and the kernel grants AMX (Linux
arch_prctl); SHARDMESH_GREEDY_HEAD=0 switches it off (A/B runs, or to save that memory).

Shape legend: S rows (one per sequence), H hidden_size, V vocab_size.
"""

import ctypes
import logging
import os
import threading

import torch

from shardmesh import compute_pool, kernels
from shardmesh.huge_pages import to_huge_pages
from shardmesh.models.matmul import KERNEL_ROWS

log = logging.getLogger(__name__)

GROUP = 64          # vocab columns per group of the packed copy (GREEDY_GROUP in lm_head_amx.c)
MAX_ROWS = 16       # a tile's rows (GREEDY_ROWS)
MAX_HIDDEN = 1040   # H 127^2 < 2^24: the int32 sums exact in fp32 (shardmesh_greedy_quantize_rows)
GROUPS_PER_UNIT = 4  # a team unit's groups: 256 columns, 128 KiB of int8 at H 512
FALLBACKS = {1: "hidden states not finite, all zero or too large, or hidden size over 1040",
             2: "an int8 product not finite",
             3: "too many candidates", 4: "no AMX"}

_pointer, _long = ctypes.c_void_p, ctypes.c_long


def _function(name: str, argtypes: list, restype):
    loaded = kernels.kernel()
    if loaded is None:
        return None
    function = getattr(loaded.library, name)
    function.argtypes, function.restype = argtypes, restype
    return function


def pack(lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed int8 copy [G * 2 * Kp / 64 * 2048], in huge pages where they are on; columns fp32 [3, G * 64]:
    norms, residuals, scales) of lm_head [V, H] (contiguous fp32 CPU), or None when a weight is not
    finite or the kernels are unavailable."""
    function = _function("shardmesh_greedy_pack", [_long, _long, _pointer, _pointer, _pointer], ctypes.c_int)
    if function is None:
        return None
    vocab, hidden = lm_head.shape
    groups, padded_hidden = -(-vocab // GROUP), -(-hidden // 64) * 64
    packed = torch.empty(groups * GROUP * padded_hidden, dtype=torch.int8)
    columns = torch.empty(3, groups * GROUP, dtype=torch.float32)
    if function(vocab, hidden, lm_head.data_ptr(), packed.data_ptr(), columns.data_ptr()):
        return None
    return to_huge_pages([packed])[0], columns


def select(hidden_states: torch.Tensor, lm_head: torch.Tensor, columns: torch.Tensor,
           scores: torch.Tensor) -> tuple[int, list[int], list[int], torch.Tensor]:
    """The selection and refinement without AMX (tests): (status, tokens [S], candidates [S], the
    tokens' fp32 logits [S]) from approximate logits `scores` [S, G * 64] fp32 (columns < V read)
    standing for the int8 product. status 0: tokens hold; else the premise that failed (FALLBACKS)."""
    function = _function("shardmesh_greedy_select", [_long] * 3 + [_pointer] * 3 + [ctypes.c_float]
                         + [_pointer] * 6, ctypes.c_int)
    rows, groups = hidden_states.shape[0], columns.shape[1] // GROUP
    maxima = torch.empty(2, groups, MAX_ROWS, dtype=torch.float32)
    tokens, candidates = (_long * max(rows, 1))(), (_long * max(rows, 1))()
    values = torch.zeros(max(rows, 1), dtype=torch.float32)
    status = function(rows, lm_head.shape[1], lm_head.shape[0], hidden_states.data_ptr(), lm_head.data_ptr(),
                      columns.data_ptr(), float(columns[0].max()), scores.data_ptr(), maxima[0].data_ptr(),
                      maxima[1].data_ptr(), tokens, candidates, values.data_ptr())
    return status, list(tokens)[:rows], list(candidates)[:rows], values[:rows]


def quantize_rows(hidden_states: torch.Tensor, max_norm: float) -> dict[str, torch.Tensor] | None:
    """The rows' two int8 levels and the bound of lm_head_amx.c (tests): {"levels": [2, S, Kp] int8,
    "step": t [S], "a", "b", "c": [S]} (e = a ||w_i|| + c r_i + b), or None (a premise failed)."""
    function = _function("shardmesh_greedy_quantize_rows", [_long, _long, _pointer, ctypes.c_float]
                         + [_pointer] * 5, ctypes.c_int)
    rows, hidden = hidden_states.shape
    out = {name: torch.empty(rows, dtype=torch.float32) for name in ("a", "b", "c", "step")}
    out["levels"] = torch.empty(2, rows, -(-hidden // 64) * 64, dtype=torch.int8)
    if function(rows, hidden, hidden_states.data_ptr(), max_norm, out["a"].data_ptr(), out["b"].data_ptr(),
                out["c"].data_ptr(), out["step"].data_ptr(), out["levels"].data_ptr()):
        return None
    return out


class GreedyHead:
    """The greedy tokens of one LM head [V, H] (fp32, contiguous, CPU), kept with its int8 copy."""

    def __init__(self, lm_head: torch.Tensor, packed: torch.Tensor, columns: torch.Tensor):
        self.lm_head, self.packed, self.columns = lm_head, packed, columns
        self.max_norm = float(columns[0].max())
        vocab, hidden = lm_head.shape
        groups = columns.shape[1] // GROUP
        # A [16, G * 64], the maxima [2, G, 16], the levels [2, 16, Kp] int8 (as floats: 8 Kp)
        self._scratch_floats = MAX_ROWS * groups * GROUP + 2 * MAX_ROWS * groups + 8 * (-(-hidden // 64) * 64)
        self._scratch = torch.empty(self._scratch_floats, dtype=torch.float32)
        self._lock = threading.Lock()  # one call at a time uses _scratch; another makes its own
        self._tokens, self._candidates = (_long * MAX_ROWS)(), (_long * MAX_ROWS)()
        self._run = _function("shardmesh_greedy_head", [_long] * 3 + [_pointer] * 4 + [ctypes.c_float]
                              + [_pointer] * 3 + [ctypes.c_int, _long], _long)
        self.last_candidates: list[int] = []  # the sizes of the candidate sets of the last call (benches)

    @classmethod
    def of(cls, lm_head: torch.Tensor | None, tp_world_size: int = 1) -> "GreedyHead | None":
        """A GreedyHead for this head, or None (off, no AMX, no kernels, a head it cannot take)."""
        if lm_head is None or tp_world_size != 1 or os.environ.get("SHARDMESH_GREEDY_HEAD", "1") == "0":
            return None
        if not kernels.usable(lm_head) or lm_head.dim() != 2 or lm_head.shape[1] > MAX_HIDDEN:
            return None
        enable = _function("shardmesh_greedy_amx_enable", [], ctypes.c_int)
        if enable is None or not enable():
            log.info("greedy LM head off: no AMX here (or the kernel refused it); the full head picks tokens")
            return None
        made = pack(lm_head)
        if made is None:
            log.info("greedy LM head off: the head has a weight that is not finite")
            return None
        return cls(lm_head, *made)

    def tokens(self, hidden_states: torch.Tensor) -> list[int] | None:
        """Each row's argmax of hidden_states [S, H] lm_head^T as the full head + numpy argmax give it,
        or None: the caller computes the full head (a premise failed)."""
        rows = hidden_states.shape[0]
        if not (KERNEL_ROWS[0] <= rows <= min(MAX_ROWS, KERNEL_ROWS[1])) or not kernels.usable(hidden_states) \
                or hidden_states.shape[1] != self.lm_head.shape[1]:
            return None
        if not self._lock.acquire(blocking=False):
            scratch, tokens, candidates = torch.empty(self._scratch_floats), (_long * MAX_ROWS)(), (_long * MAX_ROWS)()
            return self._call(hidden_states, scratch, tokens, candidates)
        try:
            return self._call(hidden_states, self._scratch, self._tokens, self._candidates)
        finally:
            self._lock.release()

    def last_scores(self, rows: int) -> torch.Tensor:
        """The int8 product A [rows, V] of the last call made with `rows` rows on the kept scratch
        (tests check the bound on it)."""
        padded = self.columns.shape[1]
        return self._scratch[:rows * padded].view(rows, padded)[:, :self.lm_head.shape[0]]

    def _call(self, hidden_states, scratch, tokens, candidates) -> list[int] | None:
        rows = hidden_states.shape[0]
        vocab, hidden = self.lm_head.shape
        status = self._run(rows, hidden, vocab, hidden_states.data_ptr(), self.lm_head.data_ptr(),
                           self.packed.data_ptr(), self.columns.data_ptr(), self.max_norm, scratch.data_ptr(),
                           tokens, candidates, compute_pool.threads(), GROUPS_PER_UNIT)
        if status:
            kernels.calls["greedy_head_fallback"] += 1
            return None
        kernels.calls["greedy_head"] += 1
        self.last_candidates = list(candidates)[:rows]
        return list(tokens)[:rows]
