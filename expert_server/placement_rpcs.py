"""The Expert service's load and placement RPCs (GetExpertLoad, LoadExperts, DropExperts), mixed
into ExpertServicer. They need from it: `name`, `shard` (ExpertShard), `meter` (ExpertLoadMeter),
`model_dir` (where LoadExperts reads weights; None = this server cannot load) and
`holdings_changed()` (called after experts were loaded or dropped)."""

import asyncio
import logging

from shardmesh.checkpoint import CheckpointReader
from shardmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from shardmesh.grpc_util import translate_errors
from shardmesh.v1 import expert_pb2, router_pb2

from expert_server.load import MAX_WINDOW_S

log = logging.getLogger(__name__)
DEFAULT_DRAIN_TIMEOUT_S = 30.0


class ExpertPlacementRpcs:
    def _info(self) -> expert_pb2.ExpertInfo:
        keys = [router_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in self.shard.experts]
        return expert_pb2.ExpertInfo(name=self.name, experts=keys)

    def _keys(self, experts, field: str = "experts") -> list[tuple[int, int]]:
        config = self.shard.config
        keys = []
        for i, key in enumerate(experts):
            if key.layer >= config.num_layers:
                raise InvalidArgument(f"{field}[{i}].layer", f"{key.layer} is outside [0, {config.num_layers})")
            if key.expert >= config.num_experts:
                raise InvalidArgument(f"{field}[{i}].expert", f"{key.expert} is outside [0, {config.num_experts})")
            keys.append((key.layer, key.expert))
        return keys

    @translate_errors
    async def GetExpertLoad(self, request, context):
        if not 0 <= request.window_seconds <= MAX_WINDOW_S:  # also refuses NaN
            raise InvalidArgument("window_seconds", f"{request.window_seconds} is outside [0, {MAX_WINDOW_S:g}]")
        tokens, busy, covered = self.meter.report(request.window_seconds)
        return expert_pb2.ExpertLoadReport(
            tokens=[expert_pb2.ExpertTokens(layer=l, expert=e, tokens=n) for (l, e), n in sorted(tokens.items())],
            busy_seconds=busy, window_seconds=covered)

    @translate_errors
    async def LoadExperts(self, request, context):
        keys = self._keys(request.experts)
        if self.model_dir is None:
            raise FailedPrecondition("experts", f"{self.name} was started without a checkpoint to load from")
        new = [key for key in keys if not self.shard.holds(*key)]
        if new:
            # Reading and warming run in a thread: this server keeps computing meanwhile.
            def read():
                reader = CheckpointReader(self.model_dir, device=str(self.shard.device))
                try:
                    return self.shard.read(new, reader, warm=True)
                finally:
                    reader.close()

            self.shard.install(await asyncio.to_thread(read))
            self.holdings_changed()
            log.info("%s: loaded %d experts, holds %d", self.name, len(new), len(self.shard.experts))
        return self._info()

    @translate_errors
    async def DropExperts(self, request, context):
        keys = self._keys(request.experts)
        if not 0 <= request.drain_timeout_seconds <= MAX_WINDOW_S:
            raise InvalidArgument("drain_timeout_seconds", f"{request.drain_timeout_seconds} is outside [0, {MAX_WINDOW_S:g}]")
        for i, key in enumerate(keys):
            if not self.shard.holds(*key):
                raise NotFound(f"experts[{i}]", f"(layer {key[0]}, expert {key[1]}) is not held by {self.name}")
        busy = await self.meter.drained(keys, request.drain_timeout_seconds or DEFAULT_DRAIN_TIMEOUT_S)
        if busy:
            raise FailedPrecondition("experts", f"{busy[:4]} still in use after the drain timeout: nothing dropped")
        self.shard.remove(keys)  # no await since the drain: no call can start using them in between
        self.holdings_changed()
        log.info("%s: dropped %d experts, holds %d", self.name, len(keys), len(self.shard.experts))
        return self._info()
