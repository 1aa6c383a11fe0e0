"""Taking one expert server replica out of the mesh for good (Admin.RemoveServer, `shardmesh
remove`): drain it (a live placement change that moves its experts elsewhere, router/rebalance.py),
then forget it. Forgotten means: not in the placement, not probed (router/expert_health.py follows
the registered addresses), not in GetClusterStatus, and its registrations refused from then on
(ClusterMap.removed), so that its process, still re-registering every few seconds until it is
stopped, does not come back. A replica that died is removed the same way, without the drain."""

import logging

from shardmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from shardmesh.v1 import admin_pb2

from router.rebalance import Rebalancer

log = logging.getLogger(__name__)


class ServerRemover:
    def __init__(self, state, rebalancer: Rebalancer):
        self.state, self.rebalancer = state, rebalancer  # state: router.main.RouterState

    def _find(self, address: str) -> tuple[str, str]:
        """(topology name, replica_id) of the expert server registered at `address`."""
        cluster = self.state.cluster
        for spec in cluster.topology.expert_servers:
            for replica_id, registered in cluster.servers[spec.name].replicas.items():
                if registered == address:
                    return spec.name, replica_id
        raise NotFound("address", f"no expert server is registered at {address!r} (see GetClusterStatus "
                                  f"replica_addresses)")

    def _check_removable(self, name: str, address: str) -> None:
        cluster = self.state.cluster
        if len(cluster.servers[name].replicas) == 1:
            raise FailedPrecondition("address", f"{address} is the last replica of {name!r}: the topology needs one "
                                                f"(start another replica first)")
        holdings = cluster.expert_holdings()
        own = set(holdings[address][1]) if address in holdings else set(
            cluster.assigned.get(address, cluster.servers[name].spec.experts))
        elsewhere = {key for a, (_, keys) in holdings.items() if a != address for key in keys}
        orphans = sorted(own - elsewhere)
        if orphans:
            raise FailedPrecondition("address", f"{address} is the only holder of {len(orphans)} experts "
                                                f"({orphans[:4]}{' ...' if len(orphans) > 4 else ''}) and cannot be "
                                                f"drained (unreachable): place them elsewhere first (rebalance --target)")

    async def remove(self, request: admin_pb2.RemoveServerRequest) -> admin_pb2.RemoveServerResponse:
        address = request.address
        if not address:
            raise InvalidArgument("address", "empty: give the host:port of an expert server replica")
        cluster = self.state.cluster
        async with self.state.registry_lock:
            name, replica_id = self._find(address)
            if len(cluster.servers[name].replicas) == 1:
                self._check_removable(name, address)  # raises: the last replica
            holds = bool(cluster.expert_holdings().get(address, ("", ()))[1])
        response = admin_pb2.RemoveServerResponse(name=name, replica_id=replica_id)
        if holds:  # reachable and holding experts: move them away first, live (takes the lock itself)
            response.drain.CopyFrom(await self.rebalancer.rebalance(admin_pb2.RebalanceRequest(drain=[address])))
            response.drained = True
        async with self.state.registry_lock:
            if self._find(address) != (name, replica_id):  # replaced meanwhile by another process
                raise FailedPrecondition("address", f"{address} registered again as another replica during the drain")
            self._check_removable(name, address)
            self._forget(name, replica_id, address)
            log.warning("expert server %s%s at %s removed from the mesh", name,
                        f" replica {replica_id!r}" if replica_id else "", address)
            await self.state.on_cluster_change()
        response.placement_version = cluster.placement_version
        return response

    def _forget(self, name: str, replica_id: str, address: str) -> None:
        cluster = self.state.cluster
        del cluster.servers[name].replicas[replica_id]
        cluster.assigned.pop(address, None)
        cluster.replica_assigned.pop((name, replica_id), None)
        cluster.unreachable.discard(address)
        cluster.removed.add((name, replica_id))
        cluster.placement_version += 1
