"""A tensor-parallel group that re-forms, as real processes on loopback: a router and two stage
processes started with `--tp-rank auto` (stage_server/tp_membership.py, router/tp_ranks.py).

1. Rank 1 freezes (SIGSTOP) mid-generation and thaws 5 s later: the group breaks, re-forms in a
   new generation, and the router replays the running sequence on it (router/failover.py waits
   for the re-form): the generation completes with transformers' tokens and logits.
2. Rank 1 is killed (SIGKILL) and started again with the same --tp-shard-id: the stage serves
   again within REFORM_BOUND_S and new requests equal transformers (tokens; logits 1e-4 rel.).
3. The same for rank 0 (it comes back at another port and registers the stage again).

Bounds are generous for a loaded 2-core CI machine (load average ~10): a restarted process
imports torch (seconds idle, tens of seconds under load) before it asks for its rank, so the
re-form bound is counted from the restart; every loop polls with a deadline; what the test
started is killed, by pid, in a finally block."""

import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from oracle import assert_greedy_matches, reference_greedy
from grpc_health.v1 import health_pb2
from shardmesh.client import Client
from shardmesh.topology import StageSpec, Topology
from test_tp_control_plane import cluster_status
from test_tp_processes import STARTUP_S, stage_state, wait_for

pytestmark = pytest.mark.slow
PROMPT, MAX_NEW_TOKENS = [5, 17, 99, 3], 24
REFORM_BOUND_S = 120.0  # from the restart: ~5-10 s idle (mostly the new process's start), 120 s at load ~10


def generate(router: str, on_token=None) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits = [], []
    with Client(router, timeout=180) as client:
        for token in client.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, return_logits=True):
            tokens.append(token.token_id)
            logits.append(torch.tensor(token.logits))
            if on_token is not None:
                on_token(len(tokens))
    return tokens, logits


def test_a_frozen_or_restarted_shard_re_forms_its_group_and_the_stage_serves_the_reference(llama_dir, tmp_path):
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(Topology((StageSpec("stage-0", 0, 4, 2),)).to_toml())
    port_file = tmp_path / "router.port"
    common = ["--model", str(llama_dir), "--topology", str(topology_file), "--no-auth", "--log-level", "INFO"]
    reference = reference_greedy(llama_dir, PROMPT, MAX_NEW_TOKENS)
    processes: dict[str, subprocess.Popen] = {}
    logs = {name: open(tmp_path / f"{name}.log", "ab") for name in ("router", "a", "b")}

    def start_shard(shard_id: str) -> None:
        processes[shard_id] = subprocess.Popen([
            sys.executable, "-m", "shardmesh.cli", "stage", *common, "--name", "stage-0", "--tp-rank", "auto",
            "--tp-shard-id", shard_id, "--router", router], stdin=subprocess.DEVNULL, stdout=logs[shard_id],
            stderr=subprocess.STDOUT)

    def serving_generation(after: int):
        """The stage's status once the router serves it with every shard in a generation > `after`."""
        status = cluster_status(router)
        [stage] = status.servers
        generations = {s.generation for s in stage.tp_shards}
        if (status.serving and len(stage.tp_shards) == 2 and len(generations) == 1 and min(generations) > after
                and stage_state(stage.address)[0] == health_pb2.HealthCheckResponse.SERVING):
            return stage
        return None

    try:
        processes["router"] = subprocess.Popen([sys.executable, "-m", "shardmesh.cli", "router", *common,
                                                "--port-file", str(port_file)], stdin=subprocess.DEVNULL,
                                               stdout=logs["router"], stderr=subprocess.STDOUT)
        wait_for(port_file.exists, STARTUP_S, "the router's port file")
        router = f"127.0.0.1:{int(port_file.read_text())}"
        for shard_id in ("a", "b"):
            start_shard(shard_id)
        try:
            stage = wait_for(lambda: serving_generation(0), STARTUP_S, "the mesh SERVING")
            assert_greedy_matches(*generate(router), *reference, context="formed")

            # 1. Rank 1 frozen after the 2nd token, thawed 5 s later: the running sequence replays.
            frozen = processes[next(s.shard_id for s in stage.tp_shards if s.rank == 1)]

            def freeze(count: int) -> None:
                if count == 2:
                    frozen.send_signal(signal.SIGSTOP)
                    threading.Timer(5.0, frozen.send_signal, (signal.SIGCONT,)).start()
            assert_greedy_matches(*generate(router, freeze), *reference, context="replayed after a freeze")
            stage = wait_for(lambda: serving_generation(stage.tp_shards[0].generation), 60, "generation 2")
            assert "tensor-parallel group re-formed: replaying running sequences" in \
                (tmp_path / "router.log").read_text(errors="replace")  # not a generation done before the freeze
            timings = {}
            for rank in (1, 0):  # 2. and 3.: killed, started again under the same id
                victim = next(s.shard_id for s in stage.tp_shards if s.rank == rank)
                processes[victim].kill()
                processes[victim].wait(timeout=30)
                restarted = time.monotonic()
                start_shard(victim)
                generation = stage.tp_shards[0].generation
                stage = wait_for(lambda: serving_generation(generation), REFORM_BOUND_S, f"re-formed without rank {rank}")
                timings[rank] = time.monotonic() - restarted
                assert {(s.rank, s.shard_id) for s in stage.tp_shards} >= {(rank, victim)}  # its rank back
                assert_greedy_matches(*generate(router), *reference, context=f"after rank {rank} restarted")
            print(f"serving again after a restart of rank 1: {timings[1]:.1f} s, of rank 0: {timings[0]:.1f} s; "
                  f"generations {[s.generation for s in stage.tp_shards]}")
        except BaseException:
            for name in logs:
                print(name, (tmp_path / f"{name}.log").read_text(errors="replace")[-4000:])
            raise
        assert all(p.poll() is None for p in processes.values()), "no process may exit"
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(timeout=30)
        for log in logs.values():
            log.close()
