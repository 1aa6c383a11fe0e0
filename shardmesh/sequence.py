"""A request as the scheduler sees it: its tokens, how far they went through the pipeline, its
events for the client; and the slice of it that one step carries (shardmesh.scheduler)."""

import asyncio
import dataclasses
import typing

import torch

from shardmesh.sampling import Sampler

MAX_REPLAYS = 3  # a sequence whose steps lose the KV more often in a row fails (UNAVAILABLE) rather than loop


class KVLost(Exception):
    """Raised by a pipeline's `step` when a stage was replaced while the step ran: the KV caches of
    every running sequence are gone there. The step's sequences stay running and are replayed."""


class SequenceSlice(typing.NamedTuple):  # (a named tuple: made for every sequence, every step)
    sequence_id: int
    start_position: int
    num_tokens: int


class TokenEvent(typing.NamedTuple):
    token_id: int
    index: int                       # among generated tokens
    finish_reason: str | None        # "length" | "stop" | None
    logits: torch.Tensor | None      # [V] fp32 when asked for


@dataclasses.dataclass(eq=False)
class Sequence:
    sequence_id: int
    prompt: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    sampler: Sampler
    return_logits: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)  # TokenEvent | Exception
    fed_tokens: int = 0              # of prompt + generated, already through the pipeline (in its KV caches)
    kv_epoch: int = 0                # the pipeline's epoch when its KV caches were built
    replays: int = 0                 # times its tokens were replayed to rebuild lost KV caches
    lost_steps: int = 0              # its steps in a row that raised KVLost
    cancelled: bool = False
    finished: bool = False

    @property
    def context_length(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def prefilling(self) -> bool:
        """More than one token to feed: the prompt, or a replay of prompt + generated."""
        fed, prompt = self.fed_tokens, len(self.prompt)
        return fed < prompt or fed < prompt + len(self.generated) - 1

    def next_slice(self, max_prompt_tokens: int) -> tuple[SequenceSlice, list[int]]:
        """The tokens of this sequence's next step: up to `max_prompt_tokens` (>= 1) of the prompt
        (or of the replayed prompt + generated) while prefilling, else the last generated token."""
        if self.prefilling:
            start = self.fed_tokens
            context = self.prompt + self.generated
            count = min(len(context) - start, max_prompt_tokens)
            return SequenceSlice(self.sequence_id, start, count), context[start:start + count]
        generated = self.generated
        return SequenceSlice(self.sequence_id, len(self.prompt) + len(generated) - 1, 1), generated[-1:]
