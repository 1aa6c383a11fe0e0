"""The client SDK works on a machine with only grpcio and protobuf: torch, numpy and the server-side
grpc extras are made unimportable in a subprocess, which then generates from the fake router."""

import json
import pathlib
import subprocess
import sys

from fake_router import FakeRouter, expected_logits

ROOT = pathlib.Path(__file__).resolve().parent.parent

CLIENT_MACHINE = r'''
import sys


class BlockServerPackages:
    """A meta-path finder that refuses what a client machine does not have."""

    BLOCKED = {"torch", "numpy", "grpc_health", "grpc_reflection", "grpc_tools", "safetensors", "transformers"}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is not installed on a client machine")
        return None


sys.meta_path.insert(0, BlockServerPackages())
try:
    import torch  # noqa: F401
    raise SystemExit("the import blocker does not work")
except ImportError:
    pass

import argparse
import json

import shardmesh
import shardmesh.client
from shardmesh import cli_generate
from shardmesh.client import Client, InvalidArgumentError

with Client(sys.argv[1], timeout=10) as client:
    generation = client.generate_all([3, 4], max_new_tokens=3, return_logits=True)
    try:
        client.generate_all("abort:INVALID_ARGUMENT")
        raise SystemExit("no error raised")
    except InvalidArgumentError as error:
        error_code = error.code
    serving = client.wait_until_serving(timeout=5).serving

parser = argparse.ArgumentParser(prog="shardmesh")
cli_generate.add_parser(parser.add_subparsers(dest="command"))
exit_code = cli_generate.run(parser.parse_args(
    ["generate", "--router", sys.argv[1], "--prompt-ids", "1,2", "--max-new-tokens", "2", "--output", "ids"]))

heavy = sorted(name for name in sys.modules if name.partition(".")[0] in BlockServerPackages.BLOCKED)
print(json.dumps({
    "token_ids": generation.token_ids,
    "logits": [list(token.logits) for token in generation.tokens],
    "error_code": error_code,
    "serving": serving,
    "cli_exit_code": exit_code,
    "heavy_modules": heavy,
}))
'''


def test_client_needs_only_grpcio_and_protobuf():
    with FakeRouter() as router:
        result = subprocess.run([sys.executable, "-c", CLIENT_MACHINE, router.address], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    cli_output, report_line = result.stdout.rstrip("\n").rsplit("\n", 1)
    report = json.loads(report_line)
    assert report["heavy_modules"] == []
    assert report["token_ids"] == [5, 6, 7]
    assert report["logits"] == [list(expected_logits(token_id)) for token_id in (5, 6, 7)]
    assert report["error_code"] == "INVALID_ARGUMENT" and report["serving"]
    assert report["cli_exit_code"] == 0 and cli_output == "3 4 "
