"""StageModels chained in one process (with LocalExperts) == transformers, over several layer splits.

A small continuous-batching greedy loop: sequences with prompts of different lengths join at
different steps, one prefills its prompt in two chunks, finished ones are freed. Every step's
logits are compared with transformers' (recomputed from scratch) and the tokens must agree.
"""

import asyncio
import dataclasses
import itertools

import pytest
import torch

from oracle import assert_greedy_matches, reference_greedy
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard, LocalExperts
from shardmesh.stage_model import StageBatch, StageModel


def load_stages(model_dir, splits, dtype=torch.float32) -> list[StageModel]:
    """One StageModel per [start, end) in `splits`, each with its own reader (as separate servers)."""
    config = ModelConfig.from_dir(model_dir)
    return [StageModel(config, start, end, CheckpointReader(model_dir), dtype) for start, end in splits]


def load_experts(model_dir, placement, dtype=torch.float32) -> LocalExperts | None:
    """placement: per shard, the (layer, expert) pairs it holds; None for a dense model."""
    if placement is None:
        return None
    config = ModelConfig.from_dir(model_dir)
    return LocalExperts([ExpertShard(config, keys, CheckpointReader(model_dir), dtype) for keys in placement])


def every_layer(config: ModelConfig, experts) -> list[tuple[int, int]]:
    return [(layer, e) for layer in range(config.num_layers) for e in experts]


async def pipeline_step(stages, experts, sequence_ids, start_positions, num_tokens, token_ids) -> torch.Tensor:
    """One step through every stage -> logits [S, V]."""
    inputs = torch.tensor(token_ids, dtype=torch.long)
    for stage in stages:
        inputs = await stage.forward(StageBatch(list(sequence_ids), list(start_positions), list(num_tokens), inputs),
                                     experts)
    return inputs


@dataclasses.dataclass
class Request:
    sequence_id: int
    prompt: list[int]
    join_step: int
    max_new_tokens: int
    prefill_chunks: tuple[int, ...] = ()  # sizes of the first prompt chunks (the rest comes in one); () = all at once
    fed: int = 0                           # tokens sent to the stages so far
    tokens: list = dataclasses.field(default_factory=list)
    step_logits: list = dataclasses.field(default_factory=list)


async def greedy_loop(stages, experts, requests: list[Request]) -> None:
    """Continuous batching: each step carries every active sequence's next chunk (prompt or last token)."""
    step = 0
    while any(len(r.tokens) < r.max_new_tokens for r in requests):
        batch = []
        for r in requests:
            if r.join_step > step or len(r.tokens) == r.max_new_tokens:
                continue
            if r.fed < len(r.prompt):
                end = next(b for b in [*itertools.accumulate(r.prefill_chunks), len(r.prompt)] if b > r.fed)
                batch.append((r, r.prompt[r.fed:end]))
            else:
                batch.append((r, r.tokens[-1:]))
        if batch:
            logits = await pipeline_step(stages, experts, [r.sequence_id for r, _ in batch], [r.fed for r, _ in batch],
                                         [len(chunk) for _, chunk in batch], [t for _, chunk in batch for t in chunk])
            for row, (r, chunk) in enumerate(batch):
                r.fed += len(chunk)
                if r.fed < len(r.prompt):
                    continue  # a prefill chunk that is not the last: its logits predict nothing new
                r.step_logits.append(logits[row])
                r.tokens.append(int(logits[row].argmax()))
                if len(r.tokens) == r.max_new_tokens:
                    assert [stage.free([r.sequence_id]) for stage in stages] == [1] * len(stages)
        step += 1


def make_requests(vocab_size: int, seed: int = 0) -> list[Request]:
    generator = torch.Generator().manual_seed(seed)

    def prompt(length):
        return torch.randint(3, vocab_size, (length,), generator=generator).tolist()

    return [
        Request(sequence_id=11, prompt=prompt(7), join_step=0, max_new_tokens=6),
        Request(sequence_id=5, prompt=prompt(12), join_step=0, max_new_tokens=4, prefill_chunks=(5,)),
        Request(sequence_id=42, prompt=prompt(1), join_step=2, max_new_tokens=5),
        Request(sequence_id=7, prompt=prompt(17), join_step=3, max_new_tokens=4),
    ]


def check_against_reference(model_dir, requests: list[Request], context: str) -> None:
    for r in requests:
        ref_tokens, ref_logits = reference_greedy(model_dir, r.prompt, r.max_new_tokens)
        assert_greedy_matches(r.tokens, r.step_logits, ref_tokens, ref_logits, context=f"{context} seq {r.sequence_id}")


# (variant, stage splits, expert placement: per shard, expert ids held in every layer, or a callable)
CASES = [
    ("mixtral", [(0, 4)], [range(8)]),
    ("mixtral", [(0, 2), (2, 4)], [range(0, 4), range(4, 8)]),
    ("mixtral", [(0, 1), (1, 4)], "by_layer"),
    ("mixtral_odd", [(0, 1), (1, 3), (3, 5)], [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 0, 1]]),  # every expert twice
    ("mixtral_odd", [(0, 5)], [range(6)]),
    ("llama", [(0, 4)], None),
    ("llama", [(0, 1), (1, 4)], None),
    ("llama_mha", [(0, 1), (1, 2), (2, 3)], None),
]


@pytest.mark.parametrize("variant, splits, placement", CASES,
                         ids=[f"{v}-{len(s)}stages-{p if isinstance(p, str) else len(p or [])}shards"
                              for v, s, p in CASES])
def test_greedy_matches_transformers(model_dirs, variant, splits, placement):
    model_dir = model_dirs[variant]
    config = ModelConfig.from_dir(model_dir)
    if placement == "by_layer":  # shard 0: every expert of layers 0-1; shard 1: of layers 2-3
        placement = [[(l, e) for l in (0, 1) for e in range(8)], [(l, e) for l in (2, 3) for e in range(8)]]
    elif placement is not None:
        placement = [every_layer(config, experts) for experts in placement]
    stages = load_stages(model_dir, splits)
    experts = load_experts(model_dir, placement)
    requests = make_requests(config.vocab_size)
    asyncio.run(greedy_loop(stages, experts, requests))
    check_against_reference(model_dir, requests, f"{variant} {splits}")
    assert all(stage.cached_sequence_ids() == [] for stage in stages)
    if experts is not None and variant == "mixtral_odd" and len(experts.shards) == 3:
        used = {(layer, e): set() for layer, e, _ in experts.tokens_routed}
        for layer, e, shard in experts.tokens_routed:
            used[(layer, e)].add(shard)
        assert any(len(shards) == 2 for shards in used.values()), "replicas were never used"


def test_bfloat16_stage_runs(mixtral_dir):
    """A bf16 mesh is not compared exactly; it must run, keep the dtype between stages, return fp32 logits."""
    config = ModelConfig.from_dir(mixtral_dir)
    stages = load_stages(mixtral_dir, [(0, 2), (2, 4)], torch.bfloat16)
    experts = load_experts(mixtral_dir, [every_layer(config, range(8))], torch.bfloat16)
    hidden_states = asyncio.run(stages[0].forward(StageBatch([1], [0], [3], torch.tensor([4, 5, 6])), experts))
    assert hidden_states.dtype == torch.bfloat16 and hidden_states.shape == (3, config.hidden_size)
    logits = asyncio.run(stages[1].forward(StageBatch([1], [0], [3], hidden_states), experts))
    assert logits.dtype == torch.float32 and logits.shape == (1, config.vocab_size)
    assert torch.isfinite(logits).all()


# --- validate(): every bad field is named -----------------------------------------------------

def _bad_batches(config: ModelConfig):
    """(description, stage index, batch, error class name, field) against stages [0,2) and [2,4)
    where sequence 1 has 4 tokens cached."""
    H, V = config.hidden_size, config.vocab_size
    ids = lambda n: torch.arange(3, 3 + n)  # noqa: E731
    return [
        ("empty", 0, StageBatch([], [], [], ids(0)), "InvalidArgument", "sequences"),
        ("duplicate ids", 0, StageBatch([1, 1], [4, 4], [1, 1], ids(2)), "InvalidArgument", "sequences"),
        ("ragged lists", 0, StageBatch([1, 2], [4], [1, 1], ids(2)), "InvalidArgument", "sequences"),
        ("zero tokens", 0, StageBatch([1, 2], [4, 0], [1, 0], ids(1)), "InvalidArgument", "sequences[1].num_tokens"),
        ("negative start", 0, StageBatch([2], [-1], [1], ids(1)), "InvalidArgument", "sequences[0].start_position"),
        ("past max positions", 0, StageBatch([1], [4], [509], ids(509)), "InvalidArgument", "sequences[0].num_tokens"),
        ("unknown sequence", 0, StageBatch([1, 9], [4, 3], [1, 1], ids(2)), "NotFound", "sequences[1].sequence_id"),
        ("start behind cache", 0, StageBatch([1], [2], [1], ids(1)), "FailedPrecondition", "sequences[0].start_position"),
        ("restart known", 0, StageBatch([1], [0], [1], ids(1)), "FailedPrecondition", "sequences[0].start_position"),
        ("token id = vocab", 0, StageBatch([2], [0], [2], torch.tensor([3, V])), "InvalidArgument", "token_ids"),
        ("token id < 0", 0, StageBatch([2], [0], [1], torch.tensor([-1])), "InvalidArgument", "token_ids"),
        ("token count", 0, StageBatch([2], [0], [3], ids(2)), "InvalidArgument", "token_ids"),
        ("float token ids", 0, StageBatch([2], [0], [2], torch.ones(2)), "InvalidArgument", "token_ids"),
        ("hidden shape", 1, StageBatch([2], [0], [2], torch.zeros(3, H)), "InvalidArgument", "hidden_states"),
        ("hidden width", 1, StageBatch([2], [0], [2], torch.zeros(2, H + 1)), "InvalidArgument", "hidden_states"),
        ("hidden dtype", 1, StageBatch([2], [0], [2], torch.zeros(2, H, dtype=torch.float64)), "InvalidArgument",
         "hidden_states"),
        ("token ids to a later stage", 1, StageBatch([2], [0], [2], ids(2)), "InvalidArgument", "hidden_states"),
    ]


def test_validate_names_each_field(llama_dir):
    from shardmesh import errors

    config = ModelConfig.from_dir(llama_dir)
    stages = load_stages(llama_dir, [(0, 2), (2, 4)])
    asyncio.run(pipeline_step(stages, None, [1], [0], [4], [3, 4, 5, 6]))
    for description, index, batch, error_name, field in _bad_batches(config):
        with pytest.raises(getattr(errors, error_name)) as caught:
            asyncio.run(stages[index].forward(batch, None))
        assert caught.value.field == field, f"{description}: field {caught.value.field!r}, expected {field!r}"
        assert [s.cached_sequence_ids() for s in stages] == [[1], [1]], description
        assert [s.cached_length(1) for s in stages] == [4, 4], description


# --- atomicity: a failed step leaves the cache as it was --------------------------------------

class FlakyExperts:
    """Wraps an ExpertBackend; raises Unavailable on `fail_layer` while `failing`."""

    def __init__(self, inner, fail_layer: int):
        self.inner, self.fail_layer, self.failing = inner, fail_layer, True

    async def run(self, layer, groups):
        from shardmesh.errors import Unavailable

        if self.failing and layer == self.fail_layer:
            raise Unavailable("experts", f"expert server for layer {layer} is down")
        return await self.inner.run(layer, groups)


@pytest.mark.parametrize("fail_layer", [2, 3])  # the first or the last layer of stage [2, 4)
def test_failed_step_leaves_cache_unchanged(mixtral_dir, fail_layer):
    from shardmesh.errors import Unavailable

    config = ModelConfig.from_dir(mixtral_dir)
    stages = load_stages(mixtral_dir, [(0, 2), (2, 4)])
    experts = FlakyExperts(load_experts(mixtral_dir, [every_layer(config, range(8))]), fail_layer)
    experts.failing = False
    prompt_a = list(range(10, 26))  # 16 tokens: the next one makes the cache grow (copy on reserve)
    logits = asyncio.run(pipeline_step(stages, experts, [1], [0], [16], prompt_a))
    next_a = int(logits[0].argmax())
    prompt_b = [7, 8, 9]

    experts.failing = True
    batch = StageBatch([1, 2], [16, 0], [1, 3], torch.tensor([next_a, *prompt_b]))
    hidden_states = asyncio.run(stages[0].forward(batch, experts))  # stage [0, 2) does not touch layer 2-3
    batch = dataclasses.replace(batch, inputs=hidden_states)
    with pytest.raises(Unavailable):
        asyncio.run(stages[1].forward(batch, experts))
    assert stages[1].cached_sequence_ids() == [1] and stages[1].cached_length(1) == 16

    experts.failing = False  # the router retries the failed stage with the same inputs
    logits = asyncio.run(stages[1].forward(batch, experts))
    ref_a, ref_a_logits = reference_greedy(mixtral_dir, prompt_a, 2)
    ref_b, ref_b_logits = reference_greedy(mixtral_dir, prompt_b, 1)
    assert next_a == ref_a[0]
    assert_greedy_matches([int(logits[0].argmax())], [logits[0]], ref_a[1:], ref_a_logits[1:], context="retried a")
    assert_greedy_matches([int(logits[1].argmax())], [logits[1]], ref_b, ref_b_logits, context="retried b")
    assert stages[1].cached_sequence_ids() == [1, 2] and stages[1].cached_length(1) == 17


class GatedExperts:
    """Holds every call until `release` is set, so a test can act while a step is in flight."""

    def __init__(self, inner):
        self.inner, self.entered, self.release = inner, asyncio.Event(), asyncio.Event()

    async def run(self, layer, groups):
        self.entered.set()
        await self.release.wait()
        return await self.inner.run(layer, groups)


def test_sequence_in_flight_is_refused_and_free_wins(mixtral_dir):
    from shardmesh.errors import FailedPrecondition

    config = ModelConfig.from_dir(mixtral_dir)
    (stage,) = load_stages(mixtral_dir, [(0, 4)])

    async def scenario():
        experts = GatedExperts(load_experts(mixtral_dir, [every_layer(config, range(8))]))
        step = asyncio.create_task(stage.forward(StageBatch([1, 2], [0, 0], [2, 1], torch.tensor([4, 5, 6])), experts))
        await experts.entered.wait()
        with pytest.raises(FailedPrecondition) as caught:
            await stage.forward(StageBatch([3, 2], [0, 0], [1, 1], torch.tensor([4, 5])), experts)
        assert caught.value.field == "sequences[1].sequence_id"
        assert stage.free([2]) == 0  # not cached yet, but must not be cached when the step ends
        experts.release.set()
        await step

    asyncio.run(scenario())
    assert stage.cached_sequence_ids() == [1] and stage.cached_length(1) == 2
