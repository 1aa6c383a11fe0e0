"""A request as the scheduler sees it: its tokens, how far they went through the pipeline, its
events for the client; and the slice of it that one step carries (shardmesh.scheduler)."""

import asyncio
import collections
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


class RenderFailed(typing.NamedTuple):
    """What a SequenceEvents reader gets where its `render` raised on a token event."""
    error: Exception


class SequenceEvents:
    """A sequence's events (TokenEvent | Exception) for its one reader, the router's Generate call:
    `put_nowait` (the scheduler) and `await get()`, in order, as with an asyncio.Queue without a
    bound, at a fraction of its cost: it runs for every token of every sequence on the router's
    event loop. One reader at a time; a `get` cancelled while waiting loses no event.

    `render` (the reader's, optional): put_nowait stores render(event) for each TokenEvent instead
    of the event (RenderFailed(error) where it raises; exceptions as they are). The scheduler hands a
    step's events over in one loop, so the readers' per-token work (the router: text, metrics, the
    response message) runs back to back on warm caches, not each between two gRPC writes."""

    __slots__ = ("_items", "_waiter", "render")

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None  # the reader's, while it waits on no events
        self.render = None  # TokenEvent -> the reader's item

    def put_nowait(self, event) -> None:
        render = self.render
        if render is not None and not isinstance(event, Exception):
            try:
                event = render(event)
            except Exception as error:  # (the putter's loop must go on to the other sequences)
                event = RenderFailed(error)
        self._items.append(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self):
        while not self._items:
            assert self._waiter is None, "SequenceEvents has one reader at a time"
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:  # cancelled before any put
                    self._waiter = None
        return self._items.popleft()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items


@dataclasses.dataclass(eq=False)
class Sequence:
    sequence_id: int
    prompt: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    sampler: Sampler
    return_logits: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)
    events: SequenceEvents = dataclasses.field(default_factory=SequenceEvents)  # TokenEvent | Exception
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
