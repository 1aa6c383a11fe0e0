"""`shardmesh status` and `shardmesh rebalance` against an in-process mesh: the commands run as
subprocesses (one with torch and numpy made unimportable: they need grpcio + protobuf only), a
planned rebalance lowers the imbalance and leaves generation unchanged, --dry-run and --min-gain
change nothing."""

import asyncio
import pathlib
import sys

from shardmesh.client import AsyncClient

from mesh_helpers import local_mesh
from placement_helpers import SPARE_TOPOLOGY, cluster_status

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_FREE = r'''
import argparse, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "numpy", "safetensors", "transformers"}:
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, Block())
from shardmesh import cli_rebalance, cli_status

parser = argparse.ArgumentParser()
commands = parser.add_subparsers(dest="command", required=True)
cli_status.add_parser(commands)
cli_rebalance.add_parser(commands)
args = parser.parse_args(sys.argv[1:])
sys.exit((cli_status if args.command == "status" else cli_rebalance).run(args))
'''
PROMPTS = [[1, 5, 9, 13], [1, 20, 31, 4, 4], [1, 7]]


async def shardmesh(*args: str, torch_free: bool = False) -> tuple[int, str, str]:
    command = ["-c", TORCH_FREE] if torch_free else ["-m", "shardmesh.cli"]
    process = await asyncio.create_subprocess_exec(sys.executable, *command, *args, cwd=ROOT,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def generate_all(address: str) -> list[list[int]]:
    async with AsyncClient(address, timeout=120) as client:
        generations = await asyncio.gather(*(client.generate_all(p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS))
    return [[t.token_id for t in g.tokens] for g in generations]


def test_status_and_rebalance_commands(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir, SPARE_TOPOLOGY) as mesh:
            before = await generate_all(mesh.address)
            code, out, err = await shardmesh("status", "--router", mesh.address, torch_free=True)
            assert code == 0, err
            for text in ("mesh serving", "experts-2", "layer 3:", "load per expert", "shade map", "█"):
                assert text in out, f"{text!r} missing from:\n{out}"
            start = await cluster_status(mesh.address)
            assert start.load_imbalance > 1.4  # experts-2 holds nothing, so it computed nothing

            code, out, err = await shardmesh("rebalance", "--router", mesh.address, "--dry-run", torch_free=True)
            assert code == 0 and "would change" in out, out + err
            assert (await cluster_status(mesh.address)).placement_version == start.placement_version

            code, out, err = await shardmesh("rebalance", "--router", mesh.address, "--window", "600")
            assert code == 0 and "placement changed" in out, out + err
            planned = await cluster_status(mesh.address)
            assert planned.placement_version == start.placement_version + 1
            assert {s.name: s.experts for s in planned.expert_servers}["experts-2"] > 0

            code, out, err = await shardmesh("rebalance", "--router", mesh.address, "--min-gain", "0.9")
            assert code == 0 and "placement kept" in out, out + err
            code, out, err = await shardmesh("status", "--router", mesh.address, "--window", "700")
            assert code == 1 and "INVALID_ARGUMENT: load_window_seconds" in err, out + err

            after = await generate_all(mesh.address)
            final = await cluster_status(mesh.address, window=600)
            return before, after, start, final

    before, after, start, final = asyncio.run(main())
    assert after == before
    # The second round ran on all three servers: the split of both rounds together moved towards even.
    assert final.load_imbalance < start.load_imbalance
