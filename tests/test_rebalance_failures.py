"""A rebalance that cannot complete leaves a working placement: an expert server that cannot
load its new replicas stops the change before any stage switches (and replicas loaded elsewhere
are dropped again); a stage that cannot be reached gets the change rolled back on every stage,
with every replica, old and new, still loaded."""

import asyncio

import grpc

from mesh_helpers import local_mesh
from placement_helpers import SPARE_TOPOLOGY, cluster_status, expert_addresses, expert_held, rebalance, target_by_address

EVERYTHING = {(l, e) for l in range(4) for e in range(8)}


def test_failed_load_and_unreachable_stage(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir, SPARE_TOPOLOGY) as mesh:
            status = await cluster_status(mesh.address, load=False)
            names = expert_addresses(status)
            a, b, spare = names["experts-0"], names["experts-1"], names["experts-2"]
            before = {address: await expert_held(address) for address in (a, b)}
            by_port = {s.port: s for s in mesh.experts}

            # experts-2 is gone: it cannot load; experts-0's new replicas are dropped again.
            await by_port[int(spare.rpartition(":")[2])].stop(grace=None)
            mesh.experts.remove(by_port[int(spare.rpartition(":")[2])])
            try:
                await rebalance(mesh.address, target=target_by_address({a: EVERYTHING, b: before[b], spare: {(0, 0)}}))
                raise AssertionError("rebalance succeeded with an unreachable expert server")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE and error.details().startswith("target:"), error
                assert spare in error.details()
            assert (await cluster_status(mesh.address, load=False)).placement_version == status.placement_version
            assert {address: await expert_held(address) for address in (a, b)} == before
            reply = await rebalance(mesh.address, slots_per_server=20)  # a plan gives it nothing
            assert spare in reply.note and "unreachable" in reply.note
            assert spare not in {e.address for e in reply.placement}

            # stage-1 is gone: the switch fails, and the old placement comes back as a newer version.
            stage = next(s for s in mesh.stages if s.servicer.model.end_layer == 4)
            await stage.stop(grace=None)
            mesh.stages.remove(stage)
            try:
                await rebalance(mesh.address, target=target_by_address({a: EVERYTHING, b: set()}))
                raise AssertionError("rebalance succeeded with an unreachable stage")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE and error.details().startswith("stage:"), error
                assert "rolled back" in error.details()
            after = await cluster_status(mesh.address, load=False)
            assert after.placement_version == status.placement_version + 2
            assert {s.name: {(k.layer, k.expert) for k in s.experts} for s in after.servers
                    if s.name in ("experts-0", "experts-1")} == {"experts-0": before[a], "experts-1": before[b]}
            assert await expert_held(a) == EVERYTHING and await expert_held(b) == before[b]  # nothing dropped
            first = next(s for s in mesh.stages if s.servicer.model.start_layer == 0)
            assert first.servicer.experts.placement.version == after.placement_version  # stage-0 rolled back too

    asyncio.run(main())
