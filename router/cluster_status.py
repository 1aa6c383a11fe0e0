"""GetClusterStatus's answer from the router's ClusterMap (router/cluster.py): every server of the
topology with its replicas, layers or experts, TP ranks and unreachable addresses, and where each
slice of each split expert is served."""

from shardmesh.topology import StageSpec
from shardmesh.v1 import router_pb2


def cluster_status(cluster, serving: bool, active_sequences: int) -> router_pb2.ClusterStatus:
    """cluster: a router.cluster.ClusterMap."""
    servers = []
    for name, registration in cluster.servers.items():
        spec = registration.spec
        status = router_pb2.ServerStatus(name=name, address=registration.address,
                                         registered=bool(registration.address),
                                         replica_addresses=registration.addresses)
        if isinstance(spec, StageSpec):
            status.role = router_pb2.SERVER_ROLE_STAGE
            status.layers.start, status.layers.end = spec.start_layer, spec.end_layer
            status.tp_shards.extend(cluster.tp_ranks.shards(name))
        else:
            status.role = router_pb2.SERVER_ROLE_EXPERT
            held = {k for a in registration.addresses for k in cluster.assigned.get(a, spec.experts)}
            status.experts.extend(router_pb2.ExpertKey(layer=l, expert=e)
                                  for l, e in sorted(held if registration.addresses else spec.experts))
            status.unreachable_addresses.extend(a for a in registration.addresses if a in cluster.unreachable)
            status.expert_slices.extend(router_pb2.ExpertSliceKey(layer=k.layer, expert=k.expert, rank=k.rank,
                                                                  count=k.tp) for k in spec.slices)
        servers.append(status)
    return router_pb2.ClusterStatus(serving=serving, placement_version=cluster.placement_version,
                                    servers=servers, active_sequences=active_sequences,
                                    unservable=cluster.unservable(), split_experts=split_status(cluster))


def split_status(cluster) -> list[router_pb2.SplitExpertStatus]:
    """Every split expert of the topology and where each of its slices is served."""
    def piece(rank: int, name: str) -> router_pb2.SplitSliceStatus:
        addresses = cluster.servers[name].addresses
        return router_pb2.SplitSliceStatus(rank=rank, server=name, addresses=addresses,
                                           unreachable_addresses=[a for a in addresses if a in cluster.unreachable])
    return [router_pb2.SplitExpertStatus(layer=layer, expert=expert,
                                         slices=[piece(rank, name) for rank, name in enumerate(names)])
            for (layer, expert), names in sorted(cluster.topology.splits().items())]
