"""An expert server's registration with the router, kept up (shardmesh.registration.RouterRegistration): it
reports the experts it holds now, so a router that restarted adopts the live placement from its
servers' reports; and when the router's placement gives this replica other experts than it holds
(it restarted after a live placement change and loaded its topology entry's), the router says so
(RegisterServerResponse.reassigned) and `hold_exactly` loads the missing ones and drops the rest
before it registers again. Placement survives a router restart this way, with no state file: the
expert servers' own holdings are the truth a file could only go stale against."""

import asyncio
import logging

from shardmesh.checkpoint import CheckpointReader
from shardmesh.registration import RouterRegistration
from shardmesh.service_config import ServiceConfig
from shardmesh.topology import ExpertServerSpec
from shardmesh.v1 import router_pb2

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 30.0  # for calls still using an expert this server is told to drop


async def hold_exactly(servicer, experts: list[tuple[int, int]]) -> None:
    """Make `servicer.shard` hold exactly `experts`: read and warm the missing ones off the event
    loop, then drop the others once no call uses them. Raises RuntimeError if that fails."""
    shard, wanted = servicer.shard, set(experts)
    missing = sorted(key for key in wanted if not shard.holds(*key))
    if missing:
        if servicer.model_dir is None:
            raise RuntimeError(f"{servicer.name} was started without a checkpoint to load its assigned experts from")

        def read():
            reader = CheckpointReader(servicer.model_dir, device=str(shard.device))
            try:
                return shard.read(missing, reader, warm=True)
            finally:
                reader.close()

        shard.install(await asyncio.to_thread(read))
    extra = [key for key in shard.experts if key not in wanted]
    if extra:
        busy = await servicer.meter.drained(extra, DRAIN_TIMEOUT_S)
        if busy:
            raise RuntimeError(f"{servicer.name}: {busy[:4]} still in use after {DRAIN_TIMEOUT_S:.0f} s: kept")
        shard.remove(extra)
    if missing or extra:
        servicer.holdings_changed()
    log.info("%s: holds its %d assigned experts (loaded %d, dropped %d)", servicer.name, len(wanted),
             len(missing), len(extra))


def router_registration(config: ServiceConfig, spec: ExpertServerSpec, servicer, port: int) -> RouterRegistration:
    """The registration of expert server `spec.name`, serving on `port`, with the router."""
    def make_request() -> router_pb2.RegisterServerRequest:
        held = tuple(servicer.shard.experts)  # sorted
        return router_pb2.RegisterServerRequest(
            name=config.name, role=router_pb2.SERVER_ROLE_EXPERT, address=config.advertised(port),
            replica_id=config.replica_id, experts=[router_pb2.ExpertKey(layer=l, expert=e) for l, e in held],
            expert_slices=[router_pb2.ExpertSliceKey(layer=p.layer, expert=p.expert, rank=p.rank, count=p.tp)
                           for p in spec.slices],
            holds_assignment=held != spec.experts, model_fingerprint=config.model.fingerprint)

    async def on_reply(reply: router_pb2.RegisterServerResponse) -> bool:
        if not reply.reassigned:
            return False
        await hold_exactly(servicer, [(k.layer, k.expert) for k in reply.assigned_experts])
        return True  # register again, holding them

    return RouterRegistration(config.router_address, make_request, config.security, config.reregister_interval_s,
                              on_reply)
