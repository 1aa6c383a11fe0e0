"""Sampling: greedy is argmax, filters keep what they should, same seed gives same tokens."""

import math

import pytest
import torch

from shardmesh.errors import InvalidArgument
from shardmesh.sampling import Sampler, SamplingParams


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 200) -> list[int]:
    sampler = Sampler(params)
    return [sampler(logits) for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert set(draws(SamplingParams(), logits, 5)) == {1}


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    a = draws(SamplingParams(temperature=1.0, seed=7), logits)
    b = draws(SamplingParams(temperature=1.0, seed=7), logits)
    c = draws(SamplingParams(temperature=1.0, seed=8), logits)
    assert a == b
    assert a != c


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert set(draws(SamplingParams(temperature=10.0, top_k=2, seed=1), logits)) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # 0.5 < 0.7 so token 1 is needed; 0.5 + 0.3 >= 0.7 so tokens 2 and 3 are dropped.
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=2), logits, 400)) == {0, 1}
    # top_p smaller than the top token's mass keeps the top token alone.
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.1, seed=3), logits, 50)) == {0}


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, math.log(3.0)])  # p = [0.25, 0.75]
    counts = draws(SamplingParams(temperature=1.0, seed=4), logits, 2000)
    share = counts.count(1) / len(counts)
    assert 0.70 < share < 0.80


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.5}, "sampling.temperature"),
    ({"temperature": float("nan")}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"top_k": -1}, "sampling.top_k"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as error:
        SamplingParams(**kwargs)
    assert error.value.field == field
