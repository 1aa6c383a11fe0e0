"""The greedy LM head (shardmesh/greedy_head.py, kernels/lm_head_amx.c) gives the full head's tokens:
each row's first maximum of the fp32 logits shardmesh_linear computes, for random and adversarial
heads and inputs; its bound holds and is tight where it must be; it refuses what its premises
exclude. The selection and refinement run on every machine with the kernels, from a bf16 product
emulated in torch; the AMX product where the CPU has AMX-BF16 (and the head is off exactly elsewhere)."""

import math
import pathlib

import pytest
import torch

from shardmesh import greedy_head, kernels
from shardmesh.greedy_head import GROUP, GreedyHead
from shardmesh.sampling import greedy_token_ids

# (V, H): V not a multiple of 16 / 64, H not a multiple of 16 / 32 (the kernels' scalar tails), the LM head's
SHAPES = [(1000, 64), (1001, 100), (4099, 200), (777, 1024), (32000, 512)]


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


def cpu_has_amx() -> bool:
    flags = pathlib.Path("/proc/cpuinfo").read_text().split() if pathlib.Path("/proc/cpuinfo").exists() else []
    return "amx_bf16" in flags and "amx_tile" in flags


def test_the_amx_path_is_on_exactly_where_the_cpu_has_amx():
    """On where /proc/cpuinfo has amx_bf16 and amx_tile, off (None: the full head decides) elsewhere,
    where every test here still checks the selection and refinement (on an emulated product)."""
    assert (GreedyHead.of(torch.randn(100, 64)) is not None) == cpu_has_amx()


def emulated_scores(x: torch.Tensor, lm_head: torch.Tensor, padded: int) -> torch.Tensor:
    """A standing for AMX's product: bf16(x) bf16(w)^T summed in fp32 (torch rounds to nearest even),
    [n, padded] with zeros past V."""
    scores = torch.zeros(x.shape[0], padded)
    scores[:, :lm_head.shape[0]] = x.bfloat16().float() @ lm_head.bfloat16().float().T
    return scores


def full_tokens(kernel, x: torch.Tensor, lm_head: torch.Tensor) -> list[int]:
    return greedy_token_ids(kernel.linear_team(x, lm_head, 2))  # today's path: the team's head + numpy argmax


def check_both(kernel, x: torch.Tensor, lm_head: torch.Tensor, amx: bool = True) -> list[int]:
    """The portable selection on emulated A, and (amx) the AMX head, against the full head."""
    want = full_tokens(kernel, x, lm_head)
    packed, norms = greedy_head.pack(lm_head)
    status, tokens, _, values = greedy_head.select(x, lm_head, norms, emulated_scores(x, lm_head, norms.shape[0]))
    assert status == 0 and tokens == want
    full = kernel.linear(x, lm_head)
    chosen = full[torch.arange(x.shape[0]), torch.tensor(tokens)]
    assert torch.equal(values.view(torch.int32), chosen.view(torch.int32))  # the refined logits: the head's bits
    head = GreedyHead.of(lm_head) if amx else None  # None: no AMX here (the test above says whether it must be)
    if head is not None:
        assert head.tokens(x) == want
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
        _, norms = greedy_head.pack(lm_head)
        status, tokens, candidates, values = greedy_head.select(x, lm_head, norms, torch.zeros(16, norms.shape[0]))
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
    noise: the bf16 product cannot tell them apart, the fp32 refinement must."""
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
    _, norms = greedy_head.pack(lm_head)
    _, _, candidates, _ = greedy_head.select(x, lm_head, norms, emulated_scores(x, lm_head, norms.shape[0]))
    assert min(candidates[:3]) >= 2  # both rows of each pair were refined


def test_refinement_overrules_the_bf16_argmax(kernel):
    """x_j = 1 + 2^-8 rounds to 1 in bf16: row 0 (every weight 1 + 2^-8, also rounded to 1) has the
    smaller A but the larger logit than row 1 (255 weights 1 + 2^-7, exact in bf16; the rest 1);
    row 2 (256 of them) ties row 0 exactly in fp32, so the first index still wins."""
    hidden = 512
    lm_head = torch.ones(3, hidden)
    lm_head[0] = 1 + 2**-8
    lm_head[1, :255] = 1 + 2**-7
    lm_head[2, :256] = 1 + 2**-7
    x = torch.full((1, hidden), 1 + 2**-8)
    assert (x.bfloat16().float() @ lm_head.bfloat16().float().T).argmax().item() == 2  # what bf16 alone picks
    assert check_both(kernel, x, lm_head) == [0]


def test_the_winner_may_have_a_bf16_score_more_than_its_bound_below_the_best(kernel):
    """Row 0's product rounds down in bf16 (x_j = w_j = 1 + 2^-8 on the first half of k), row 100's
    up (w_j = 1 + 3 2^-8 rounds to 1 + 2^-6 on 255 of the second half, where x_j = 1): row 100's A is
    more than e above row 0's, its logit below. Row 0 sits in a group whose best A is under the
    floor m_s (the group's A + e at its largest norm is not): bounds per group that lose e, or take
    the group's smallest norm, skip it."""
    hidden, half = 512, 256
    lm_head = torch.zeros(130, hidden)
    lm_head[0, :half] = 1 + 2**-8
    lm_head[100, half:half + 255] = 1 + 3 * 2**-8
    x = torch.ones(1, hidden)
    x[0, :half] = 1 + 2**-8
    scores = x.bfloat16().float() @ lm_head.bfloat16().float().T  # [1, 130]
    logits = kernel.linear(x, lm_head)
    assert scores.argmax().item() == 100 and scores[0, 100] - scores[0, 0] > 2.9 and logits.argmax().item() == 0
    assert check_both(kernel, x, lm_head) == [0]


def test_the_bound_holds_and_is_tight(kernel):
    """|L - A| <= e on random cases (emulated A, and AMX's A where it runs), incl. weights that bf16
    flushes to zero and products that underflow; in the worst case for
    the rounding (x_j = w_j = 1 + 2^-8, both rounded down by 2^-8 relative, Cauchy-Schwarz an
    equality) e is within 4% of the error: halving c or dropping a factor fails here."""
    generator = torch.Generator().manual_seed(5)
    cases = [(torch.randn(4, 300, generator=generator) * 0.1, torch.randn(500, 300, generator=generator) * scale)
             for scale in (1e-38, 1e-20, 1.0, 1e10)]  # 1e-38: weights below 2^-126, flushed in bf16
    cases.append((torch.full((1, 512), 1 + 2**-8), torch.full((64, 512), 1 + 2**-8)))
    for x, lm_head in cases:
        _, norms = greedy_head.pack(lm_head)
        a, b = greedy_head.row_bounds(x, float(norms.max()))
        bound = a.double()[:, None] * norms[:lm_head.shape[0]].double()[None, :] + b.double()[:, None]  # [n, V]
        logits = kernel.linear(x, lm_head).double()
        error = (logits - emulated_scores(x, lm_head, lm_head.shape[0]).double()).abs()
        assert (error <= bound).all()
        head = GreedyHead.of(lm_head)
        if head is not None:
            tokens = head.tokens(x)  # None at 1e-38: the underflow terms open every column (> 64: fall back)
            tiny = lm_head.abs().max() < 1e-30
            assert tokens == greedy_token_ids(kernel.linear(x, lm_head)) or (tokens is None and tiny)
            assert ((logits - head.last_scores(x.shape[0]).double()).abs() <= bound).all()
    assert (error / bound).min() > 0.96  # the last case: the bound is tight


def test_premises_fall_back(kernel):
    generator = torch.Generator().manual_seed(6)
    lm_head = torch.randn(1000, 128, generator=generator)
    x = torch.randn(3, 128, generator=generator)
    _, norms = greedy_head.pack(lm_head)
    padded = norms.shape[0]
    for bad in (math.inf, -math.inf, math.nan):
        broken = x.clone()
        broken[1, 5] = bad
        assert greedy_head.select(broken, lm_head, norms, emulated_scores(x, lm_head, padded))[0] == 1
    assert greedy_head.select(x * 1e30, lm_head, norms, emulated_scores(x, lm_head, padded))[0] == 1  # overflow room
    scores = emulated_scores(x, lm_head, padded)
    scores[2, 999] = math.nan
    assert greedy_head.select(x, lm_head, norms, scores)[0] == 2
    assert greedy_head.select(x, lm_head, norms, torch.zeros(3, padded))[0] == 3  # all 1000 open: over the cap
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


def test_off_switch_and_no_tp(monkeypatch):
    lm_head = torch.randn(100, 64)
    assert GreedyHead.of(lm_head, tp_world_size=2) is None
    monkeypatch.setenv("SHARDMESH_GREEDY_HEAD", "0")
    assert GreedyHead.of(lm_head) is None
    assert GROUP == 64
