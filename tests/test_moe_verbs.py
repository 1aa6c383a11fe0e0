"""combine(experts(dispatch(x))) == reference_moe(x), and reference_moe == transformers' Mixtral block."""

import pytest
import torch

from shardmesh.models.moe import combine, dispatch, reference_moe, route

from oracle import mixtral_moe_block


def tagged_experts(num_experts: int, hidden: int, seed: int):
    """expert(e, x) = x @ W_e + e: distinct per expert, so a misrouted row fails loudly."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_experts, hidden, hidden, generator=generator)
    return lambda e, x: x @ weights[e] + e


@pytest.mark.parametrize("num_tokens, hidden, num_experts, top_k", [
    (0, 8, 4, 2),     # no tokens at all
    (1, 8, 4, 1),
    (5, 16, 8, 2),
    (3, 8, 16, 3),    # most experts get no token
    (64, 16, 8, 2),
    (9, 8, 4, 4),     # every token to every expert
])
def test_dispatch_combine_equals_reference(num_tokens, hidden, num_experts, top_k):
    generator = torch.Generator().manual_seed(num_tokens * 31 + top_k)
    hidden_states = torch.randn(num_tokens, hidden, generator=generator)          # [T, H]
    router_logits = 3 * torch.randn(num_tokens, num_experts, generator=generator)  # [T, E]
    expert = tagged_experts(num_experts, hidden, seed=num_experts)

    groups, handle = dispatch(hidden_states, router_logits, top_k)
    _, topk_idx = route(router_logits, top_k)
    for e in range(num_experts):
        chosen = (topk_idx == e).any(dim=-1).nonzero().flatten()  # tokens routed to e, in token order
        if len(chosen) == 0:
            assert e not in groups
        else:
            torch.testing.assert_close(groups[e], hidden_states[chosen], rtol=0, atol=0)
    assert list(handle.experts) == sorted(groups)
    outputs = {e: expert(e, x) for e, x in groups.items()}
    combined = combine(outputs, handle)
    assert combined.shape == (num_tokens, hidden)
    torch.testing.assert_close(combined, reference_moe(hidden_states, router_logits, top_k, expert),
                               rtol=1e-5, atol=1e-5)


def test_combine_refuses_bad_outputs():
    hidden_states, router_logits = torch.randn(4, 8), torch.randn(4, 4)
    groups, handle = dispatch(hidden_states, router_logits, 2)
    outputs = dict(groups)
    first = handle.experts[0]
    with pytest.raises(ValueError, match="no output"):
        combine({e: x for e, x in outputs.items() if e != first}, handle)
    with pytest.raises(ValueError, match="shape"):
        combine({**outputs, first: outputs[first][:-1]}, handle)


def test_reference_matches_transformers_mixtral_block():
    """Routing rule and w1/w3 roles against transformers' MixtralSparseMoeBlock (fused gate_up layout)."""
    gate_weight, hidden_states, expected, mlps = mixtral_moe_block(hidden=16, experts=6, tokens=11)
    router_logits = hidden_states @ gate_weight.T
    groups, handle = dispatch(hidden_states, router_logits, 2)
    ours = combine({e: mlps[e](x) for e, x in groups.items()}, handle)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    reference = reference_moe(hidden_states, router_logits, 2, lambda e, x: mlps[e](x))
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_dispatch_combine_is_bitwise_a_row_of_a_batch(top_k, dtype):
    """A token decoded alone (dispatch's one-token path: no index op, combine by sum) gets the same
    bits as the same token inside a batch (the index path): a row's result must not depend on the batch."""
    generator = torch.Generator().manual_seed(top_k)
    hidden_states = torch.randn(6, 16, generator=generator).to(dtype)          # [T, H]
    router_logits = 3 * torch.randn(6, 8, generator=generator).to(dtype)       # [T, E]
    scales = torch.randn(8, 16, generator=generator)
    expert = lambda e, x: x * scales[e] + e  # row by row (a matmul's bits may depend on its row count)
    run = lambda x, logits: combine({e: expert(e, g.float()).to(dtype) for e, g in dispatch(x, logits, top_k)[0].items()},
                                    dispatch(x, logits, top_k)[1])
    batch = run(hidden_states, router_logits)                                  # [T, H]
    for t in range(6):
        groups, handle = dispatch(hidden_states[t:t + 1], router_logits[t:t + 1], top_k)
        assert list(groups) == sorted(groups) == list(handle.experts) and len(groups) == top_k
        alone = run(hidden_states[t:t + 1], router_logits[t:t + 1])            # [1, H]
        assert alone.dtype == dtype
        assert torch.equal(alone, batch[t:t + 1]), (t, (alone - batch[t:t + 1]).abs().max())
