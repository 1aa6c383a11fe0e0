"""One decode step broken down per hop, so the overhead of each is visible.

    .venv/bin/python bench/step_breakdown.py [--small] [--batch 16] [--stages 1|2]

Each part is measured on its own, on the same checkpoint and batch:
- compute, in this process with one torch thread (as each service runs): a StageModel of every
  layer and an ExpertShard of every expert behind a timed LocalExperts, decoding `--steps` steps;
  expert compute is the time inside the backend, stage compute the rest (attention, norms, gates,
  dispatch/combine, embedding, LM head);
- transport, to echo servers in another process (bench/echo_servers.py: the right reply sizes,
  no compute), over gRPC bytes and over shared memory: a stage -> expert ComputeExperts round
  trip carrying one MoE layer's groups of this batch, made directly and through the stage's own
  RemoteExperts.run (replica spread, failover bookkeeping, metrics: the one summed), and a router
  -> stage Step round trip with a hidden-states reply (a middle stage) and with a logits reply
  (the last stage); the hops of `--data-plane` are summed, the others shown for comparison;
- end to end: a mesh of real processes (Launcher, `--stages` stages and as many expert servers,
  one micro-batch) decoding the batch, time per output token as the client sees it.
The rest (end to end minus the parts) is the router's scheduling and sampling, the servicers'
decode/encode, the token stream to the client and switching between processes.
"""

import argparse
import asyncio
import os
import pathlib
import sys
import tempfile
import time

import torch

import harness
import hops
import mesh_configs
from decode_throughput import make_prompts, run_mesh

COLUMNS = [("part", "part of one decode step"), ("each_ms", "ms each"), ("count", "per step"),
           ("step_ms", "ms per step"), ("share", "share of end to end")]


class TimedExperts:
    """An ExpertBackend that times the backend it wraps and keeps the last step's groups per layer."""

    def __init__(self, backend):
        self.backend, self.seconds, self.groups = backend, 0.0, {}

    async def run(self, layer, groups):
        start = time.perf_counter()
        outputs = await self.backend.run(layer, groups)
        self.seconds += time.perf_counter() - start
        self.groups[layer] = groups
        return outputs


def measure_compute(model_dir: pathlib.Path, prompts: list[list[int]], steps: int) -> dict:
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.expert_model import ExpertShard, LocalExperts
    from shardmesh.stage_model import StageBatch, StageModel

    config = ModelConfig.from_dir(model_dir)
    reader = CheckpointReader(model_dir)
    stage = StageModel(config, 0, config.num_layers, reader)
    experts = TimedExperts(LocalExperts([ExpertShard(
        config, [(l, e) for l in range(config.num_layers) for e in range(config.num_experts)], reader)]))
    ids = list(range(1, len(prompts) + 1))
    prompt_length = len(prompts[0])

    async def decode() -> tuple[float, float]:
        batch = StageBatch(ids, [0] * len(ids), [prompt_length] * len(ids), torch.tensor(sum(prompts, [])))
        next_ids = (await stage.forward(batch, experts)).argmax(-1)  # [B]
        total = expert = 0.0
        for step in range(steps + 2):
            experts.seconds = 0.0
            start = time.perf_counter()
            batch = StageBatch(ids, [prompt_length + step] * len(ids), [1] * len(ids), next_ids)
            next_ids = (await stage.forward(batch, experts)).argmax(-1)
            if step >= 2:  # warm-up
                total += time.perf_counter() - start
                expert += experts.seconds
        return total / steps, expert / steps

    total, expert = asyncio.run(decode())
    return dict(stage_s=total - expert, expert_s=expert, groups=experts.groups, config=config)


async def measure_transport(addresses: dict, groups: dict, batch: int, hidden_size: int, rounds: int) -> dict:
    """Seconds per round trip of each hop over each plane, plus an empty ComputeExperts over gRPC."""
    layer_groups = next(iter(groups.values()))
    results = {"empty": await hops.expert_round_trip(addresses["expert"], "grpc", {}, rounds)}
    for plane in hops.PLANES:
        results[("expert", plane)] = await hops.expert_round_trip(addresses["expert"], plane, layer_groups, rounds)
        results[("remote_experts", plane)] = await hops.remote_experts_round_trip(addresses["expert"], plane,
                                                                                  layer_groups, rounds)
        for name in ("stage_hidden", "stage_logits"):
            results[(name, plane)] = await hops.stage_round_trip(addresses[name], plane, batch, hidden_size, rounds)
    results["expert_bytes"] = sum(x.numel() * x.element_size() for x in layer_groups.values())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--stages", type=int, default=1, choices=[1, 2], help="of the end-to-end mesh")
    parser.add_argument("--steps", type=int, default=10, help="decode steps timed in process")
    parser.add_argument("--rounds", type=int, default=50, help="round trips timed per hop")
    parser.add_argument("--data-plane", default="shm", choices=hops.PLANES, help="of the end-to-end mesh")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per service (and of the compute here)")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=harness.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    shape = "small" if args.small else "default"
    model_dir = harness.checkpoint(shape, args.cache_dir)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    from shardmesh.config import ModelConfig
    config = ModelConfig.from_dir(model_dir)
    prompts = make_prompts(config.vocab_size, args.batch, 16)
    compute = measure_compute(model_dir, prompts, args.steps)
    torch.set_num_threads(threads)

    with hops.echo_servers(config.vocab_size) as addresses:
        import uvloop
        transport = uvloop.run(measure_transport(addresses, compute["groups"], args.batch, config.hidden_size,
                                                 args.rounds))

    mesh = mesh_configs.MeshConfig(args.stages, args.stages, threads=args.threads, data_plane=args.data_plane)
    from shardmesh.launcher import Launcher
    with tempfile.TemporaryDirectory() as workdir:
        topology = mesh.write(pathlib.Path(workdir) / "topology.toml", config)
        with Launcher(model_dir, topology, threads_per_service=mesh.thread_counts, service_args=mesh.service_args,
                      no_auth=True) as launcher:
            end_to_end = run_mesh(launcher.router_address, launcher.client_token, prompts, 24)["tpot_s"]

    layers, plane = config.num_layers, args.data_plane
    parts = [
        (f"stage compute (attention, norms, gates, dispatch/combine, LM head), {args.threads} thread(s)",
         compute["stage_s"], 1),
        (f"expert compute (every MoE layer), {args.threads} thread(s)", compute["expert_s"], 1),
    ]
    for name in hops.PLANES:  # the other plane's hops are shown for comparison, not summed
        parts += [
            (f"stage -> expert round trip, {name}, one layer's groups ({transport['expert_bytes'] / 1024:.0f} KiB "
             f"each way), the call alone", transport[("expert", name)], 0),
            (f"stage -> expert round trip, {name}, the same through the stage's RemoteExperts.run",
             transport[("remote_experts", name)], layers if name == plane else 0),
            (f"router -> stage round trip, {name}, hidden-states reply", transport[("stage_hidden", name)],
             args.stages - 1 if name == plane else 0),
            (f"router -> stage round trip, {name}, logits reply", transport[("stage_logits", name)],
             1 if name == plane else 0),
        ]
    rows = [dict(part=name, each_ms=seconds * 1e3, count=count, step_ms=seconds * count * 1e3,
                 share=f"{seconds * count / end_to_end:.0%}") for name, seconds, count in parts]
    accounted = sum(seconds * count for _, seconds, count in parts)
    rows.append(dict(part="sum of the parts", step_ms=accounted * 1e3, share=f"{accounted / end_to_end:.0%}"))
    rows.append(dict(part=f"end to end: {args.stages} stage(s) + {args.stages} expert server(s), {plane}, "
                          f"client ms/token",
                     step_ms=end_to_end * 1e3, share="100%"))
    rows.append(dict(part="rest: scheduling, sampling, servicers' codec, client stream, process switches",
                     step_ms=(end_to_end - accounted) * 1e3, share=f"{(end_to_end - accounted) / end_to_end:.0%}"))
    header = (f"one decode step, {shape} shape, batch {args.batch}; an empty gRPC round trip (no tensors) costs "
              f"{transport['empty'] * 1e3:.2f} ms here; 1-min load average {os.getloadavg()[0]:.1f}")
    harness.report(f"step_breakdown-{shape}-b{args.batch}", header, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
