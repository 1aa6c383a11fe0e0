"""ClusterMap: the topology the router was given and the servers that registered against it.

The router owns it; it is the one place that knows which address serves which layers and
experts, and the version of the expert placement pushed to stages."""

import dataclasses

from shardmesh.config import ModelConfig
from shardmesh.errors import FailedPrecondition, InvalidArgument, NotFound
from shardmesh.topology import ExpertServerSpec, ExpertSlice, StageSpec, Topology
from shardmesh.v1 import router_pb2, stage_pb2

from router.cluster_status import cluster_status
from router.tp_ranks import TPRanks

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
        # The same by replica, (topology name, replica_id) -> experts, so that a replica that restarts
        # (at this or another address, even after being dropped as dead) is told to hold them again.
        self.replica_assigned: dict[tuple[str, str], tuple[tuple[int, int], ...]] = {}
        self.lost: dict[str, str] = {}  # name -> why its last server was dropped (until one registers again)
        # Expert server addresses that fail the router's health probes (router/expert_health.py):
        # still registered, left out of the placement until they answer again.
        self.unreachable: set[str] = set()
        # Expert server replicas (topology name, replica_id) an operator removed (router/remove.py):
        # their registrations are refused, so a process left running does not come back.
        self.removed: set[tuple[str, str]] = set()
        # Ranks of tensor-parallel shards that ask the router for theirs (router/tp_ranks.py).
        self.tp_ranks = TPRanks(self.topology, config)

    @property
    def complete(self) -> bool:
        return all(r.address for r in self.servers.values())

    def missing(self) -> list[str]:
        return [name for name, r in self.servers.items() if not r.address]

    def unservable(self) -> list[str]:
        """Why the router cannot serve now, one human-readable reason each; empty = it can.
        Health (NOT_SERVING while not empty) and admission (Generate's UNAVAILABLE) read this."""
        reasons = []
        for name, registration in self.servers.items():
            if registration.address:
                continue
            spec = registration.spec
            what = (f"stage {name!r} (layers [{spec.start_layer}, {spec.end_layer}))" if isinstance(spec, StageSpec)
                    else f"expert server {name!r}")
            lost = self.lost.get(name)
            reasons.append(f"{what} has no live server: {lost}" if lost else f"{what} has not registered yet")
        return reasons + self._experts_without_live_replica() + self._slices_without_live_replica()

    def _slices_without_live_replica(self) -> list[str]:
        """Split-expert servers registered but with no reachable replica: their slices cannot be computed."""
        splits = self.topology.splits()
        down = sorted({name for names in splits.values() for name in names if self.servers[name].addresses
                       and all(a in self.unreachable for a in self.servers[name].addresses)})
        return [f"expert server {name!r} holds slices of {sum(name in n for n in splits.values())} split experts "
                f"and no replica of it is reachable ({', '.join(self.servers[name].addresses)})" for name in down]

    def _experts_without_live_replica(self) -> list[str]:
        """Once every expert server has registered: the (layer, expert) no reachable server holds."""
        if not self.config.is_moe or any(not self.servers[s.name].address for s in self.topology.expert_servers):
            return []
        held = {key for _, keys in self.expert_holdings().values() for key in keys} | set(self.topology.splits())
        missing = [(l, e) for l in range(self.config.num_layers) for e in range(self.config.num_experts)
                   if (l, e) not in held]
        if not missing:
            return []
        names = {a: spec.name for spec in self.topology.expert_servers for a in self.servers[spec.name].addresses}
        down = ", ".join(f"{names[a]} at {a}" for a in sorted(self.unreachable) if a in names) or "none"
        shown = ", ".join(f"(layer {l}, expert {e})" for l, e in missing[:6]) + (" ..." if len(missing) > 6 else "")
        return [f"no live expert server holds {len(missing)} experts: {shown} (unreachable: {down})"]

    def set_reachable(self, address: str, reachable: bool) -> bool:
        """Record a health probe's verdict on a registered expert server; True when that changed the
        placement (its version is then bumped: push it to the stages)."""
        if reachable == (address not in self.unreachable):
            return False
        if reachable:
            self.unreachable.discard(address)
        else:
            self.unreachable.add(address)
        self.placement_version += 1
        return True

    def drop_replica(self, name: str, address: str, reason: str) -> str:
        """Forget the replica of `name` at `address` (it died); return the address now first in line
        ("" when none is left: `unservable` then says why). For a stage the first is the active one
        and the others are standbys, in registration order."""
        registration = self.servers[name]
        for replica_id in [r for r, a in registration.replicas.items() if a == address]:
            del registration.replicas[replica_id]
        if not registration.address:
            self.lost[name] = f"{address} {reason}"
        return registration.address

    def stage_addresses(self, standbys: bool = False) -> list[tuple[str, str]]:
        """(name, address) of each stage's active server in pipeline order ("" = none); with
        `standbys`, of every registered server of each stage (the active one first)."""
        if standbys:
            return [(s.name, a) for s in self.topology.stages for a in self.servers[s.name].addresses]
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
        if (request.name, request.replica_id) in self.removed:
            raise FailedPrecondition("replica_id", f"{request.name!r} replica {request.replica_id!r} was removed from "
                                     f"the mesh (Admin.RemoveServer): stop it, or start it with another replica id")
        registration = self.servers[request.name]
        spec = registration.spec
        if isinstance(spec, StageSpec):
            if request.role != router_pb2.SERVER_ROLE_STAGE:
                raise FailedPrecondition("role", f"{spec.name!r} is a stage in the topology")
            if request.replica_id and not spec.standbys:
                raise FailedPrecondition("replica_id", f"{spec.name!r} is a stage without standbys in the topology "
                                         f"(standbys = 0): it has one server, with an empty replica_id")
            held = (request.layers.start, request.layers.end)
            if held != (spec.start_layer, spec.end_layer):
                raise FailedPrecondition("layers", f"{spec.name!r} holds {list(held)} but the topology says "
                                         f"[{spec.start_layer}, {spec.end_layer})")
            if request.placement_version >= 2**62:  # leaves room to number after it (stages refuse >= 2**63)
                raise InvalidArgument("placement_version", f"{request.placement_version} is not below 2**62")
            if request.placement_version > self.placement_version:  # this router restarted: number after it
                self.placement_version = request.placement_version + 1
            if registration.replicas.get(request.replica_id) == request.address:
                return registration  # a periodic re-registration: nothing changed (a standby stays one)
        else:
            if request.role != router_pb2.SERVER_ROLE_EXPERT:
                raise FailedPrecondition("role", f"{spec.name!r} is an expert server in the topology")
            held = tuple(sorted((k.layer, k.expert) for k in request.experts))
            if held != spec.experts and not request.holds_assignment:
                raise FailedPrecondition("experts", f"{spec.name!r} holds {len(held)} experts that differ from "
                                         f"the topology's {len(spec.experts)}")
            for i, (layer, expert) in enumerate(held if request.holds_assignment else ()):
                if layer >= self.config.num_layers or expert >= self.config.num_experts:
                    raise InvalidArgument(f"experts[{i}]", f"(layer {layer}, expert {expert}) is outside "
                                          f"{self.config.num_layers} layers x {self.config.num_experts} experts")
            slices = {ExpertSlice(k.layer, k.expert, k.rank, k.count) for k in request.expert_slices}
            if slices != set(spec.slices):
                raise FailedPrecondition("expert_slices", f"{spec.name!r} holds {len(slices)} expert slices that "
                                         f"differ from the topology's {len(spec.slices)}")
            previous = registration.replicas.get(request.replica_id)
            if (previous == request.address and self.assigned.get(request.address, spec.experts) == held
                    and request.address not in self.unreachable):
                return registration  # a periodic re-registration: nothing changed
            self.placement_version += 1
            if previous and previous != request.address:  # this replica restarted at another address
                self.assigned.pop(previous, None)
            # What it holds is its placement: its topology entry's, or (a router that restarted
            # hearing from a server placed live before) the assignment it reports.
            if held == spec.experts:
                self.assigned.pop(request.address, None)
                self.replica_assigned.pop((request.name, request.replica_id), None)
            else:
                self.assigned[request.address] = self.replica_assigned[(request.name, request.replica_id)] = held
            self.unreachable.discard(request.address)  # it answers again
        # One address is one server: a replica that held it before under another id has gone
        # (restarted with a new id), so it is replaced rather than listed twice.
        for replica_id in [r for r, a in registration.replicas.items() if a == request.address]:
            del registration.replicas[replica_id]
        registration.replicas[request.replica_id] = request.address
        self.lost.pop(request.name, None)
        return registration

    def registration_state(self) -> tuple:
        """What registrations can change (placement version, every server's replicas, in order)."""
        return self.placement_version, tuple((name, tuple(r.replicas.items())) for name, r in self.servers.items())

    def assignment_to_restore(self, request: router_pb2.RegisterServerRequest) -> tuple[tuple[int, int], ...] | None:
        """For an expert server registering: the experts the placement gives its replica (topology
        name and replica_id, at its address before) when they differ from what it reports holding
        (it restarted after a live placement change), else None. Such a registration is not
        recorded: the server is told to hold these, and registers again."""
        assigned = self.replica_assigned.get((request.name, request.replica_id))
        registration = self.servers.get(request.name)
        if assigned is None and registration is not None and request.replica_id in registration.replicas:
            # Known here, placed by the topology: this router's view wins over experts loaded or
            # dropped behind its back. Only a replica it does not know (it restarted) is adopted.
            assigned = getattr(registration.spec, "experts", None)
        if (assigned is None or request.role != router_pb2.SERVER_ROLE_EXPERT
                or request.model_fingerprint != self.config.fingerprint):
            return None  # register() checks (and refuses) the rest
        held = tuple(sorted((k.layer, k.expert) for k in request.experts))
        topology_experts = getattr(registration.spec, "experts", None) if registration is not None else None
        if not request.holds_assignment and held != topology_experts:
            return None  # not its topology entry and no assignment claimed: register() refuses it
        if any(layer >= self.config.num_layers or expert >= self.config.num_experts for layer, expert in held):
            return None  # keys outside the model: register() refuses them, naming the field
        return None if held == assigned else assigned

    def expert_holdings(self) -> dict[str, tuple[str, tuple[tuple[int, int], ...]]]:
        """address -> (topology name, experts it holds) of every registered expert server process
        that is reachable (those failing health probes are left out until they answer again)."""
        return {address: (spec.name, self.assigned.get(address, spec.experts))
                for spec in self.topology.expert_servers for address in self.servers[spec.name].addresses
                if address not in self.unreachable}

    def set_expert_placement(self, experts: dict[str, tuple[tuple[int, int], ...]]) -> int:
        """A live placement change: address -> the experts it holds now. Returns the new version."""
        self.assigned.update({address: tuple(sorted(keys)) for address, keys in experts.items()})
        self.replica_assigned = {(spec.name, replica_id): self.assigned[address]
                                 for spec in self.topology.expert_servers
                                 for replica_id, address in self.servers[spec.name].replicas.items()
                                 if address in self.assigned}
        self.placement_version += 1
        return self.placement_version

    def placement(self) -> stage_pb2.ExpertPlacement:
        replicas: dict[tuple[int, int], list[str]] = {}
        for address, (_, keys) in self.expert_holdings().items():
            for key in keys:
                replicas.setdefault(key, []).append(address)
        locations = [stage_pb2.ExpertLocation(layer=layer, expert=expert, addresses=addresses)
                     for (layer, expert), addresses in sorted(replicas.items())]
        # Split experts (shardmesh.split_expert) stay where the topology puts them: slice r on names[r],
        # on every reachable replica of it (the stages fail over among them; all when none answers).
        slices = {name: [a for a in self.servers[name].addresses if a not in self.unreachable]
                  or self.servers[name].addresses for names in self.topology.splits().values() for name in names}
        locations += [stage_pb2.ExpertLocation(
            layer=layer, expert=expert, slice_addresses=[slices[name][0] if slices[name] else "" for name in names],
            slice_replicas=[stage_pb2.SliceReplicas(addresses=slices[name]) for name in names])
            for (layer, expert), names in sorted(self.topology.splits().items())]
        return stage_pb2.ExpertPlacement(version=self.placement_version, locations=locations)

    def status(self, serving: bool, active_sequences: int) -> router_pb2.ClusterStatus:
        """GetClusterStatus's answer (router/cluster_status.py)."""
        return cluster_status(self, serving, active_sequences)
