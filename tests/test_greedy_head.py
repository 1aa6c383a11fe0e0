"""The greedy LM head (shardmesh/greedy_head.py, kernels/lm_head_amx.c) gives the full head's tokens:
each row's first maximum of the fp32 logits shardmesh_linear computes, for random and adversarial
heads and inputs; its bound holds and is tight where it must be; it refuses what its premises
exclude. The selection and refinement run on every machine with the kernels, from the int8 product
emulated in torch (the same roundings in the same order: the same bits as AMX's); the AMX product
where the CPU has AMX-INT8 (and the head is off exactly elsewhere), checked bit for bit against
the emulation."""

import math
import pathlib

import pytest
import torch

from shardmesh import greedy_head, kernels
from shardmesh.greedy_head import GROUP, GreedyHead
from shardmesh.sampling import greedy_token_ids

# (V, H): V not a multiple of 16 / 32 / 64, H not a multiple of 16 / 64 (the kernels' scalar tails, the
# padded k-steps), the LM head's
SHAPES = [(1000, 64), (1001, 100), (4099, 200), (777, 1024), (32000, 512)]


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


def cpu_has_amx() -> bool:
    flags = pathlib.Path("/proc/cpuinfo").read_text().split() if pathlib.Path("/proc/cpuinfo").exists() else []
    return "amx_int8" in flags and "amx_tile" in flags


def test_the_amx_path_is_on_exactly_where_the_cpu_has_amx_int8():
    """On where /proc/cpuinfo has amx_int8 and amx_tile, off (None: the full head decides) elsewhere,
    where every test here still checks the selection and refinement (on an emulated product)."""
    assert (GreedyHead.of(torch.randn(100, 64)) is not None) == cpu_has_amx()


def emulated_scores(x: torch.Tensor, lm_head: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A as AMX gives it, [n, padded] with zeros past V: P = p q^T and P' = p' q^T exact (float64 holds
    them), then fl(fl(fl(256 P + P') s_i) t_s) in fp32, q = round(w / s) as the pack makes it."""
    quantized = greedy_head.quantize_rows(x, float(columns[0].max()))
    vocab, hidden = lm_head.shape
    scales = columns[2, :vocab].double()
    safe = torch.where(scales > 0, scales, torch.ones(()))
    q = torch.where(scales[:, None] > 0, (lm_head.double() / safe[:, None]).round(), torch.zeros(()))
    q = q.clamp(-127, 127)  # [V, H]
    coarse, fine = (level[:, :hidden].double() @ q.T for level in quantized["levels"])  # [n, V] each
    scores = torch.zeros(x.shape[0], columns.shape[1])
    scores[:, :vocab] = ((coarse.float() * 256 + fine.float()) * columns[2, :vocab]) * quantized["step"][:, None]
    return scores


def bound(x: torch.Tensor, lm_head: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """e [n, V] in float64 from the kernel's a, b, c and the pack's norms and residuals."""
    quantized = greedy_head.quantize_rows(x, float(columns[0].max()))
    vocab = lm_head.shape[0]
    norms, residuals = columns[0, :vocab].double(), columns[1, :vocab].double()
    return (quantized["a"].double()[:, None] * norms + quantized["c"].double()[:, None] * residuals
            + quantized["b"].double()[:, None])


def full_tokens(kernel, x: torch.Tensor, lm_head: torch.Tensor) -> list[int]:
    return greedy_token_ids(kernel.linear_team(x, lm_head, 2))  # today's path: the team's head + numpy argmax


def check_both(kernel, x: torch.Tensor, lm_head: torch.Tensor) -> list[int]:
    """The portable selection on emulated A, and the AMX head (where it runs, its A bit for bit the
    emulation's), against the full head."""
    want = full_tokens(kernel, x, lm_head)
    _, columns = greedy_head.pack(lm_head)
    scores = emulated_scores(x, lm_head, columns)
    status, tokens, _, values = greedy_head.select(x, lm_head, columns, scores)
    assert status == 0 and tokens == want
    full = kernel.linear(x, lm_head)
    chosen = full[torch.arange(x.shape[0]), torch.tensor(tokens)]
    assert torch.equal(values.view(torch.int32), chosen.view(torch.int32))  # the refined logits: the head's bits
    head = GreedyHead.of(lm_head)  # None: no AMX here (the test above says whether it must be)
    if head is not None:
        assert head.tokens(x) == want
        assert torch.equal(head.last_scores(x.shape[0]), scores[:, :lm_head.shape[0]])
    return want


@pytest.mark.parametrize("vocab, hidden", SHAPES)
def test_random_heads_give_the_full_heads_tokens(kernel, vocab, hidden):
    generator = torch.Generator().manual_seed(vocab + hidden)
    lm_head = torch.randn(vocab, hidden, generator=generator) * 0.05
    for rows in (1, 2, 7, 9, 16):
        check_both(kernel, torch.randn(rows, hidden, generator=generator) * 3, lm_head)


def test_every_column_a_candidate_refines_to_the_heads_bits(kernel):
    """A of zeros leaves all 64 columns open: the refinement alone decides, over pairs and a lone
    last column, K with a scalar tail (the full head's bits compared for each row's winner)."""
    generator = torch.Generator().manual_seed(7)
    for vocab, hidden in ((64, 72), (63, 17)):
        lm_head = torch.randn(vocab, hidden, generator=generator)
        x = torch.randn(16, hidden, generator=generator)
        _, columns = greedy_head.pack(lm_head)
        status, tokens, candidates, values = greedy_head.select(x, lm_head, columns, torch.zeros(16, columns.shape[1]))
        full = kernel.linear(x, lm_head)
        assert status == 0 and candidates == [vocab] * 16 and tokens == greedy_token_ids(full)
        assert torch.equal(values.view(torch.int32), full.max(dim=1).values.view(torch.int32))


def test_exact_ties_go_to_the_first_index(kernel):
    generator = torch.Generator().manual_seed(3)
    lm_head = torch.randn(2000, 256, generator=generator) * 0.05
    for copy in (700, 1500, 1999):
        lm_head[copy] = lm_head[400]  # duplicates of row 400
    x = torch.stack([lm_head[400] * 40, lm_head[400] * 40 + torch.randn(256, generator=generator) * 0.01])
    assert check_both(kernel, x, lm_head) == [400, 400]


def test_near_ties_one_ulp_apart(kernel):
    """Rows one ulp apart in one weight (their fp32 logits equal or an ulp apart), and a row plus tiny
    noise: the int8 product cannot tell them apart, the fp32 refinement must."""
    generator = torch.Generator().manual_seed(4)
    lm_head = torch.randn(3000, 512, generator=generator) * 0.05
    for row, k in ((10, 5), (2000, 511)):
        lm_head[row + 1] = lm_head[row]
        lm_head[row + 1, k] = torch.nextafter(lm_head[row, k], torch.tensor(math.inf))
    lm_head[2500] = lm_head[900] + torch.randn(512, generator=generator) * 1e-7
    x = torch.stack([lm_head[10] * 30, lm_head[2000] * 30, lm_head[900] * 30, -lm_head[10] * 30])
    x[:3] = x[:3].abs() * lm_head[[10, 2000, 900]].sign()  # every product positive: the ulp raises the dot
    want = check_both(kernel, x, lm_head)
    assert want[0] in (10, 11) and want[1] in (2000, 2001) and want[2] in (900, 2500)
    _, columns = greedy_head.pack(lm_head)
    _, _, candidates, _ = greedy_head.select(x, lm_head, columns, emulated_scores(x, lm_head, columns))
    assert min(candidates[:3]) >= 2  # both rows of each pair were refined


def rounding_rows(hidden: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """x = ones (exact in the levels) and two head rows of scale 1 / 127 (their first weight 1):
    `down` has every other weight at 63.499 / 127 (q = 63: A rounds down by 0.499 / 127 each),
    `up` half of them at 63.501 / 127 (q = 64, up) and half at 63.3 / 127 (q = 63): up's A is about 2
    above down's, its logit about 0.4 below."""
    down, up = torch.full((hidden,), 63.499 / 127), torch.full((hidden,), 63.3 / 127)
    up[1:hidden // 2] = 63.501 / 127
    down[0] = up[0] = 1.0
    return torch.ones(1, hidden), torch.stack([down, up])


def test_refinement_overrules_the_int8_argmax(kernel):
    x, rows = rounding_rows()
    lm_head = torch.cat([rows, torch.zeros(1, 512)])
    _, columns = greedy_head.pack(lm_head)
    scores, logits = emulated_scores(x, lm_head, columns), kernel.linear(x, lm_head)
    assert scores[0, :3].argmax().item() == 1 and scores[0, 1] - scores[0, 0] > 1.9  # what int8 alone picks
    assert logits.argmax().item() == 0 and logits[0, 0] - logits[0, 1] > 0.3
    assert check_both(kernel, x, lm_head) == [0]


def test_the_winner_may_have_an_int8_score_more_than_its_bound_below_the_best(kernel):
    """The rows of the test above as row 0 (group 0) and row 100 (group 1): row 100's A is more than
    its e above row 0's, so row 0's whole group has its best A under the floor m_s while its A + e
    at the group's largest norm and residual is not: bounds per group that lose e, or take the
    group's smallest norm or residual, skip it."""
    x, rows = rounding_rows()
    lm_head = torch.zeros(130, 512)
    lm_head[0], lm_head[100] = rows
    _, columns = greedy_head.pack(lm_head)
    scores, e = emulated_scores(x, lm_head, columns), bound(x, lm_head, columns)
    assert scores[0, 100] - e[0, 100] > scores[0, 0]  # the floor is above group 0's best A
    assert check_both(kernel, x, lm_head) == [0]


def check_bound(kernel, x: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """|L - A| <= e on emulated A and (where it runs) AMX's; returns |L - A| / e [n, V]."""
    _, columns = greedy_head.pack(lm_head)
    e = bound(x, lm_head, columns)
    logits = kernel.linear(x, lm_head).double()
    error = (logits - emulated_scores(x, lm_head, columns)[:, :lm_head.shape[0]].double()).abs()
    assert (error <= e).all()
    head = GreedyHead.of(lm_head)
    if head is not None:
        tokens = head.tokens(x)  # None where the underflow terms open more than 64 columns (tiny heads)
        assert tokens == greedy_token_ids(kernel.linear(x, lm_head)) or (tokens is None and lm_head.abs().max() < 1e-30)
        assert ((logits - head.last_scores(x.shape[0]).double()).abs() <= e).all()
    return error / e


def test_the_bound_holds_on_extreme_weights(kernel):
    """Tiny weights (scales below 2^-126, products underflowing), huge ones, scales mixed within a
    row (1e-3 next to 1e3: most weights quantize to 0), x likewise."""
    generator = torch.Generator().manual_seed(5)
    for scale in (1e-38, 1e-20, 1.0, 1e10):
        check_bound(kernel, torch.randn(4, 300, generator=generator) * 0.1, torch.randn(500, 300, generator=generator) * scale)
    mixed = torch.randn(500, 300, generator=generator) * 1e-3
    mixed[:, ::37] *= 1e6
    x = torch.randn(4, 300, generator=generator)
    x[:, ::41] *= 1e5
    check_bound(kernel, x, mixed)
    check_bound(kernel, torch.randn(3, 300, generator=generator) * 1e-35, torch.randn(500, 300, generator=generator))


def test_the_bound_is_tight():
    """Where one term of e carries the error (Cauchy-Schwarz an equality), e is within 10% of it:
    the weights' residual (rounding_rows' down row against x = ones: every weight 0.499 / 127 high)
    and the rows' (x's small entries 100.4999 fine steps each: p' = 100 for all, w = ones exact).
    Halving any term of a or c fails one of these."""
    x, rows = rounding_rows()
    ratios = check_bound(kernels.kernel(), x, rows[:1].clone())
    assert ratios.min() > 0.95
    x = torch.full((1, 512), 100.4999 / 32512)
    x[0, 0] = 1.0
    ratios = check_bound(kernels.kernel(), x, torch.ones(2, 512))
    assert ratios.min() > 0.85


def test_premises_fall_back(kernel):
    generator = torch.Generator().manual_seed(6)
    lm_head = torch.randn(1000, 128, generator=generator)
    x = torch.randn(3, 128, generator=generator)
    _, columns = greedy_head.pack(lm_head)
    scores = emulated_scores(x, lm_head, columns)
    for bad in (math.inf, -math.inf, math.nan):
        broken = x.clone()
        broken[1, 5] = bad
        assert greedy_head.select(broken, lm_head, columns, scores)[0] == 1
    assert greedy_head.select(x * 1e30, lm_head, columns, scores)[0] == 1  # overflow room
    zero = x.clone()
    zero[2] = 0
    assert greedy_head.select(zero, lm_head, columns, scores)[0] == 1  # t_s = 0
    denormal = x.clone()
    denormal[0] = 1e-45  # max |x| / 32512 rounds to 0
    assert greedy_head.select(denormal, lm_head, columns, scores)[0] == 1
    wide = torch.randn(1000, 1041, generator=generator)
    _, wide_columns = greedy_head.pack(wide)
    assert greedy_head.quantize_rows(torch.randn(2, 1041), float(wide_columns[0].max())) is None  # K > 1040
    assert greedy_head.quantize_rows(torch.randn(2, 1040), 1.0) is not None
    nan_scores = scores.clone()
    nan_scores[2, 999] = math.nan
    assert greedy_head.select(x, lm_head, columns, nan_scores)[0] == 2
    assert greedy_head.select(x, lm_head, columns, torch.zeros(3, columns.shape[1]))[0] == 3  # all open: over the cap
    weights = lm_head.clone()
    weights[77, 3] = math.nan
    assert greedy_head.pack(weights) is None and GreedyHead.of(weights) is None
    head = GreedyHead.of(lm_head)
    if head is not None:
        broken = x.clone()
        broken[0, 0] = math.nan
        before = kernels.calls["greedy_head_fallback"]
        assert head.tokens(broken) is None and head.tokens(torch.randn(17, 128)) is None
        assert head.tokens(x.double()) is None and kernels.calls["greedy_head_fallback"] == before + 1
        assert head.tokens(x * 1e-30) == full_tokens(kernel, x * 1e-30, lm_head)
        assert head.tokens(zero) is None and kernels.calls["greedy_head_fallback"] == before + 2
    assert GreedyHead.of(wide) is None  # H over 1040: never packed
    assert (GreedyHead.of(wide[:, :1040].contiguous()) is None) == (head is None)  # 1040: on where AMX is


def test_off_switch_and_no_tp(monkeypatch):
    lm_head = torch.randn(100, 64)
    assert GreedyHead.of(lm_head, tp_world_size=2) is None
    monkeypatch.setenv("SHARDMESH_GREEDY_HEAD", "0")
    assert GreedyHead.of(lm_head) is None
    assert GROUP == 64
