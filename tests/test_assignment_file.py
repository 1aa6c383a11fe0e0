"""Expert servers started with an assignment file (expert_server/assignment_file.py) keep the
experts a live rebalance gave them across a restart of the router and themselves together: the
restarted router adopts them from the servers' reports, the tokens are those of before, and the
moved experts are still computed where the rebalance put them. Without the files the same
restarts lose the rebalance (the servers come back with their topology entries)."""

import asyncio
import dataclasses
import json

from shardmesh import grpc_util
from shardmesh.config import ModelConfig

from expert_server.assignment_file import AssignmentFile
from placement_helpers import SPARE_TOPOLOGY, cluster_status, expert_tokens
from test_router_restart import MOVED, Mesh, generate, held_by_name, move_experts


class FileMesh(Mesh):
    """test_router_restart's mesh; its expert servers keep assignment files in `directory` (or none)."""

    def __init__(self, model_dir, directory=None):
        super().__init__(model_dir)
        self.directory = directory

    def server_config(self, name: str):
        config = super().server_config(name)
        if self.directory is None or name.startswith("stage"):
            return config
        return dataclasses.replace(config, assignment_file=self.directory / f"{name}.json")


async def restart_router_and_experts(mesh: Mesh) -> None:
    await mesh.router.stop(grace=None)
    for name in ("experts-1", "experts-2"):  # those the rebalance changed
        await mesh.servers[name].stop(grace=None)
    await mesh.start_router()  # knows only the topology
    for name in ("experts-1", "experts-2"):
        await mesh.start_server(name)  # at new ports, as new processes
    await grpc_util.wait_for_health(mesh.address, 60)


def test_a_rebalance_survives_the_router_and_expert_servers_restarting_together(mixtral_dir, tmp_path):
    async def main():
        async with FileMesh(mixtral_dir, tmp_path) as mesh:
            baseline = await generate(mesh.address)
            await move_experts(mesh)
            record = json.loads((tmp_path / "experts-2.json").read_text())
            assert {tuple(k) for k in record["experts"]} == MOVED and record["name"] == "experts-2"
            before = held_by_name(await cluster_status(mesh.address, load=False))

            await restart_router_and_experts(mesh)
            after = held_by_name(await cluster_status(mesh.address, load=False))
            assert after == before and after["experts-2"] == MOVED
            restarted = f"127.0.0.1:{mesh.servers['experts-2'].port}"
            assert await generate(mesh.address) == baseline
            tokens = await expert_tokens(restarted)
            assert set(tokens) <= MOVED and sum(tokens.values()) > 0  # computed where the rebalance put them

    asyncio.run(asyncio.wait_for(main(), 180))


def test_without_the_files_the_same_restarts_lose_the_rebalance(mixtral_dir):
    async def main():
        async with FileMesh(mixtral_dir) as mesh:
            await move_experts(mesh)
            await restart_router_and_experts(mesh)
            after = held_by_name(await cluster_status(mesh.address, load=False))
            assert after["experts-2"] == set()  # its topology entry: empty
            assert after["experts-1"] == set(SPARE_TOPOLOGY.server("experts-1").experts)

    asyncio.run(asyncio.wait_for(main(), 180))


def test_a_record_of_another_server_replica_or_checkpoint_is_ignored(mixtral_dir, tmp_path):
    model = ModelConfig.from_dir(mixtral_dir)
    path = tmp_path / "a.json"
    AssignmentFile(path, "experts-2", "r1", model).write([(1, 4), (0, 5)])
    assert AssignmentFile(path, "experts-2", "r1", model).read() == ((0, 5), (1, 4))
    assert AssignmentFile(path, "experts-1", "r1", model).read() is None
    assert AssignmentFile(path, "experts-2", "r2", model).read() is None
    other = dataclasses.replace(model, fingerprint="another checkpoint")
    assert AssignmentFile(path, "experts-2", "r1", other).read() is None
    AssignmentFile(path, "experts-2", "r1", model).write([])  # a drained server: an empty assignment, kept
    assert AssignmentFile(path, "experts-2", "r1", model).read() == ()
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "experts": [[model.num_layers, 0]]}))
    assert AssignmentFile(path, "experts-2", "r1", model).read() is None  # outside the model
    path.write_text("{not json")
    assert AssignmentFile(path, "experts-2", "r1", model).read() is None
    assert AssignmentFile(tmp_path / "missing.json", "experts-2", "r1", model).read() is None
