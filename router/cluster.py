"""ClusterMap: the topology the router was given and the servers that registered against it.

The router owns it; it is the one place that knows which address serves which layers and
experts, and the version of the expert placement pushed to stages."""

import dataclasses

from shardmesh.config import ModelConfig
from shardmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from shardmesh.topology import ExpertServerSpec, StageSpec, Topology
from shardmesh.v1 import router_pb2, stage_pb2

MAX_REPLICA_ID_CHARS = 253  # a DNS name's length: room for any host name or pod name


@dataclasses.dataclass
class Registration:
    """One topology entry and the servers that registered as it: a stage has one; an expert
    server has one per replica id (a scaled service), keyed by id, in registration order."""
    spec: StageSpec | ExpertServerSpec
    replicas: dict[str, str] = dataclasses.field(default_factory=dict)  # replica_id -> host:port

    @property
    def address(self) -> str:
        """The first replica's address ("" until one registered)."""
        return next(iter(self.replicas.values()), "")

    @property
    def addresses(self) -> list[str]:
        return list(self.replicas.values())


class ClusterMap:
    def __init__(self, topology: Topology, config: ModelConfig):
        self.topology = topology.validate(config)
        self.config = config
        self.servers = {spec.name: Registration(spec) for spec in (*topology.stages, *topology.expert_servers)}
        self.placement_version = 0
        # address -> experts a live placement change gave that expert server (router/rebalance.py);
        # an address not here holds its topology entry's experts (what it registered with).
        self.assigned: dict[str, tuple[tuple[int, int], ...]] = {}

    @property
    def complete(self) -> bool:
        return all(r.address for r in self.servers.values())

    def missing(self) -> list[str]:
        return [name for name, r in self.servers.items() if not r.address]

    def stage_addresses(self) -> list[tuple[str, str]]:
        """(name, address) of each stage in pipeline order."""
        return [(s.name, self.servers[s.name].address) for s in self.topology.stages]

    def register(self, request: router_pb2.RegisterServerRequest) -> Registration:
        """Check a registration against the topology and record it (raises naming the field)."""
        if request.name not in self.servers:
            raise NotFound("name", f"{request.name!r} is not in the topology (has {sorted(self.servers)})")
        host, _, port = request.address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument("address", f"{request.address!r} is not host:port with a port in [1, 65535]")
        if len(request.replica_id) > MAX_REPLICA_ID_CHARS:
            raise InvalidArgument("replica_id", f"{len(request.replica_id)} characters, more than {MAX_REPLICA_ID_CHARS}")
        if request.model_fingerprint != self.config.fingerprint:
            raise FailedPrecondition("model_fingerprint", f"{request.model_fingerprint!r} differs from the router's "
                                     f"{self.config.fingerprint!r}: servers must load the same checkpoint")
        registration = self.servers[request.name]
        spec = registration.spec
        if isinstance(spec, StageSpec):
            if request.role != router_pb2.SERVER_ROLE_STAGE:
                raise FailedPrecondition("role", f"{spec.name!r} is a stage in the topology")
            if request.replica_id:
                raise FailedPrecondition("replica_id", f"{spec.name!r} is a stage: stages have no replicas "
                                         f"(a stage holds its sequences' KV cache)")
            held = (request.layers.start, request.layers.end)
            if held != (spec.start_layer, spec.end_layer):
                raise FailedPrecondition("layers", f"{spec.name!r} holds {list(held)} but the topology says "
                                         f"[{spec.start_layer}, {spec.end_layer})")
        else:
            if request.role != router_pb2.SERVER_ROLE_EXPERT:
                raise FailedPrecondition("role", f"{spec.name!r} is an expert server in the topology")
            held = tuple(sorted((k.layer, k.expert) for k in request.experts))
            if held != spec.experts:
                raise FailedPrecondition("experts", f"{spec.name!r} holds {len(held)} experts that differ from "
                                         f"the topology's {len(spec.experts)}")
            self.placement_version += 1
            self.assigned.pop(request.address, None)  # (re)started: it holds its topology experts
        # One address is one server: a replica that held it before under another id has gone
        # (restarted with a new id), so it is replaced rather than listed twice.
        for replica_id in [r for r, a in registration.replicas.items() if a == request.address]:
            del registration.replicas[replica_id]
        registration.replicas[request.replica_id] = request.address
        return registration

    def expert_holdings(self) -> dict[str, tuple[str, tuple[tuple[int, int], ...]]]:
        """address -> (topology name, experts it holds) of every registered expert server process."""
        return {address: (spec.name, self.assigned.get(address, spec.experts))
                for spec in self.topology.expert_servers for address in self.servers[spec.name].addresses}

    def set_expert_placement(self, experts: dict[str, tuple[tuple[int, int], ...]]) -> int:
        """A live placement change: address -> the experts it holds now. Returns the new version."""
        self.assigned.update({address: tuple(sorted(keys)) for address, keys in experts.items()})
        self.placement_version += 1
        return self.placement_version

    def placement(self) -> stage_pb2.ExpertPlacement:
        replicas: dict[tuple[int, int], list[str]] = {}
        for address, (_, keys) in self.expert_holdings().items():
            for key in keys:
                replicas.setdefault(key, []).append(address)
        return stage_pb2.ExpertPlacement(version=self.placement_version, locations=[
            stage_pb2.ExpertLocation(layer=layer, expert=expert, addresses=addresses)
            for (layer, expert), addresses in sorted(replicas.items())])

    def status(self, serving: bool, active_sequences: int) -> router_pb2.ClusterStatus:
        servers = []
        for name, registration in self.servers.items():
            spec = registration.spec
            status = router_pb2.ServerStatus(name=name, address=registration.address,
                                             registered=bool(registration.address),
                                             replica_addresses=registration.addresses)
            if isinstance(spec, StageSpec):
                status.role = router_pb2.SERVER_ROLE_STAGE
                status.layers.start, status.layers.end = spec.start_layer, spec.end_layer
            else:
                status.role = router_pb2.SERVER_ROLE_EXPERT
                held = {k for a in registration.addresses for k in self.assigned.get(a, spec.experts)}
                status.experts.extend(router_pb2.ExpertKey(layer=l, expert=e)
                                      for l, e in sorted(held if registration.addresses else spec.experts))
            servers.append(status)
        return router_pb2.ClusterStatus(serving=serving, placement_version=self.placement_version,
                                        servers=servers, active_sequences=active_sequences)
