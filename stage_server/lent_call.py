"""Lent: RemoteExperts.lend(layer), one MoE layer's expert call whose tensors stay in the shared-memory
session it goes over: the packed groups are written there by MoEGate.dispatch (rows) and the answer
is read there by the combine (run's outputs), so the session is held until the block ends.

    async with experts.lend(layer) as lent:
        groups, handle = gate.dispatch(hidden_states, out=lent.rows(T * K, H, dtype))
        hidden_states = combine(await lent.run(groups), handle, residual)   # inside the block

Shape legend: T tokens, K experts per token, H hidden_size.
"""

import typing

import torch

if typing.TYPE_CHECKING:
    from stage_server.remote_experts import RemoteExperts


class Lent:
    """RemoteExperts.lend(layer): an async context holding, while it lasts, the shared-memory session
    of the layer's one server that its call goes over (taken at entry when one is idle)."""

    __slots__ = ("experts", "layer", "session", "call", "placed")

    def __init__(self, experts: "RemoteExperts", layer: int):
        self.experts, self.layer = experts, layer
        self.session = None  # the taken session (shm_pool._Session), released at exit
        self.call = None     # its ShmCall, until the layer's call uses it
        self.placed = None   # (rows, (offset, length)): `rows` and where they lie in the segment

    async def __aenter__(self) -> "Lent":
        experts, sole = self.experts, self.experts._sole.get(self.layer)
        pool = experts.data_planes.ready(sole[0]) if sole is not None and experts.nccl_links is None else None
        session = pool.idle_session() if pool is not None else None
        if session is not None:  # an idle session (entering it waits for nothing)
            self.call = await session.__aenter__()
            self.session = session
        return self

    def rows(self, count: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Room for the call's packed groups [count, width] in the taken session's segment (the call
        then sends them without a copy: shm_segment.ReplyArena.claim), or None: make them elsewhere."""
        call = self.call
        if call is None or call.channel.cuda is not None:
            return None
        self.placed = call.arena.claim([count, width], dtype)  # the call names their span (PackedCall.request)
        return self.placed[0] if self.placed is not None else None

    async def run(self, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """RemoteExperts.run, over the taken session when it applies: the outputs may view its segment."""
        return await self.experts._run(self.layer, groups, self)

    async def release(self) -> None:
        session, self.session, self.call = self.session, None, None
        if session is not None:  # the call went through, or marked the session broken: release as any call
            await session.__aexit__(None, None, None)

    async def __aexit__(self, kind, error, traceback) -> bool:
        await self.release()
        return False
