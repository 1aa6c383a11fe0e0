"""What the stage and expert servers' start-up shares (stage_server/main.py, expert_server/main.py):
finding this server's own topology entry, and once it serves, registering with the router and
staying registered (shardmesh.registration) until it stops."""

from shardmesh.grpc_util import RunningServer
from shardmesh.registration import RouterRegistration
from shardmesh.topology import ExpertServerSpec, StageSpec

ROLES = {StageSpec: "stage", ExpertServerSpec: "expert server"}


def own_spec(config, kind: type[StageSpec] | type[ExpertServerSpec]) -> StageSpec | ExpertServerSpec:
    """The topology entry of `config.name` (a ServiceConfig); ValueError when it is not a `kind`."""
    spec = config.topology.server(config.name)
    if not isinstance(spec, kind):
        other = next(role for cls, role in ROLES.items() if isinstance(spec, cls))
        raise ValueError(f"{config.name!r} is {'an' if other[0] == 'e' else 'a'} {other} in the topology, "
                         f"not {'an' if ROLES[kind][0] == 'e' else 'a'} {ROLES[kind]}")
    return spec


async def keep_registered(running: RunningServer, registration: RouterRegistration, on_registered=None) -> None:
    """Register `running` with the router (retrying while it is unreachable; a refusal raises), await
    `on_registered()` if given, then register again every interval until the server stops."""
    await registration.register()
    if on_registered is not None:
        await on_registered()
    registration.start()  # again every interval: a restarted router gets this server back
    running.on_stop_first(registration.stop)
