"""Decode throughput: transformers `generate` in one process vs shardmesh meshes of real processes.

    .venv/bin/python bench/decode_throughput.py            # the issue's shape (567 MB fp32)
    .venv/bin/python bench/decode_throughput.py --small    # a small Mixtral, for a quick run

On one seeded checkpoint, for batch 1 and 16 (same prompts, greedy, no early stop), it measures
time per output token (mean gap between a sequence's consecutive tokens once decoding, as the
client sees it) and decode tokens/s (batch / that gap) for every configuration, plus the
memory-bandwidth floor: weight bytes one decode step must read (experts counted as the distinct
experts transformers' gates actually picked per layer and step) / the read bandwidth of a large
tensor, both measured in this run. Meshes are `shardmesh.launcher.Launcher` processes; clients
are the SDK's AsyncClient. transformers runs with each of `--transformers-threads` and ratios are
against its fastest. Each row is the best of `--repeats` runs; "CPU ms/step" is the CPU time all
of a configuration's processes spent per decode step, which other work on a shared machine hardly
changes (wall times it does: the 1-min load average is printed). Writes the table (and raw
figures) under bench/results/; bench/plot_steps.py charts time per step by configuration from them.
With `--llama-cpp BIN --gguf FILE` it adds llama.cpp's rows on the same checkpoint (bench/llamacpp_rows.py).
"""

import argparse
import asyncio
import gc
import os
import pathlib
import random
import sys
import tempfile
import time

import torch

import harness
import mesh_configs
from baseline import run_transformers

COLUMNS = [("config", "configuration"), ("batch", "batch"), ("tpot_ms", "ms/token"), ("tokens_per_s", "tok/s"),
           ("vs_transformers", "x transformers tok/s"), ("vs_floor", "x floor time"), ("cpu_ms", "CPU ms/step"),
           ("agree", "same tokens")]


def make_prompts(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab_size) for _ in range(length - 1)] for _ in range(count)]


async def _mesh_generate(address: str, token: str | None, prompts: list[list[int]],
                         new_tokens: int) -> tuple[list, list]:
    from shardmesh.client import AsyncClient

    stamps: list[list[float]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    async with AsyncClient(address, timeout=900, token=token) as client:
        async def one(i: int):
            async for token in client.generate(prompts[i], max_new_tokens=new_tokens, ignore_eos=True):
                stamps[i].append(time.perf_counter())
                tokens[i].append(token.token_id)

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return stamps, tokens


def run_mesh(address: str, token: str | None, prompts: list[list[int]], new_tokens: int, repeats: int = 1,
             pids: dict[str, int] | None = None) -> dict:
    """Time per output token: the mean gap between a sequence's tokens, skipping the first three
    (prefill, joining), pooled over the batch; the best of `repeats` runs. Also the CPU time the
    mesh's processes (`pids`: name -> pid) spent per decode step in that run, in all and by
    process: unlike wall time, other work on the machine hardly changes it."""
    pids = pids or {}
    asyncio.run(_mesh_generate(address, token, prompts, 4))  # warm-up at the same batch size
    best, cpu, by_process = float("inf"), float("nan"), {}
    for _ in range(repeats):
        before = {name: harness.cpu_seconds([pid]) for name, pid in pids.items()}
        stamps, tokens = asyncio.run(_mesh_generate(address, token, prompts, new_tokens))
        gaps = [b - a for s in stamps for a, b in zip(s[3:], s[4:])]
        if sum(gaps) / len(gaps) < best:
            by_process = {name: (harness.cpu_seconds([pid]) - before[name]) / new_tokens for name, pid in pids.items()}
            best, cpu = sum(gaps) / len(gaps), sum(by_process.values())
    return dict(tpot_s=best, tokens=tokens, cpu_s=cpu, cpu_by_process=by_process)


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(tokens, reference))
    return f"{same}/{len(reference)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small Mixtral instead of the issue's shape")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--new-tokens", type=int, default=0, help="tokens per sequence (default 48; 24 with --small)")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--configs", default="", help=f"comma-separated subset of {list(mesh_configs.CONFIGS)}")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=harness.DEFAULT_CACHE)
    parser.add_argument("--auth", action="store_true", help="bearer tokens on (default: the mesh runs --no-auth)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row, the best counts (default 2)")
    parser.add_argument("--llama-cpp", type=pathlib.Path, help="a llama.cpp build's bin folder (llama-batched-bench): "
                        "adds llama.cpp rows on --gguf (bench/llamacpp_rows.py)")
    parser.add_argument("--gguf", type=pathlib.Path, help="the same checkpoint as an f32 GGUF, for --llama-cpp")
    parser.add_argument("--transformers-threads", default="2,1", help="thread counts tried for transformers; "
                        "ratios are against the fastest (default 2,1)")
    args = parser.parse_args(argv)
    shape = "small" if args.small else "default"
    new_tokens = args.new_tokens or (24 if args.small else 48)
    batches = [int(b) for b in args.batches.split(",")]
    chosen = [c for c in args.configs.split(",") if c] or mesh_configs.DEFAULT
    unknown = set(chosen) - set(mesh_configs.CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}")
    if (args.llama_cpp is None) != (args.gguf is None):
        parser.error("--llama-cpp and --gguf go together")

    model_dir = harness.checkpoint(shape, args.cache_dir)
    from shardmesh.config import ModelConfig
    config = ModelConfig.from_dir(model_dir)
    prompts = make_prompts(config.vocab_size, max(batches), args.prompt_length)
    load_before = os.getloadavg()[0]
    bandwidth = harness.read_bandwidth()
    print(f"{shape} checkpoint {model_dir} ({sum(harness.tensor_bytes(model_dir).values()) / 1e6:.0f} MB fp32), "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} torch threads here", flush=True)

    rows, floors, reference = [], {}, {}
    for batch in batches:
        results = {threads: run_transformers(model_dir, prompts[:batch], new_tokens, threads, args.repeats)
                   for threads in (int(t) for t in args.transformers_threads.split(","))}
        reference[batch] = min(results.values(), key=lambda r: r["tpot_s"])
        touched = reference[batch]["experts_touched"]
        weight_bytes = harness.weight_bytes_per_step(model_dir, batch, touched)
        floors[batch] = dict(weight_bytes=weight_bytes, floor_s=weight_bytes / bandwidth, experts_touched=touched)
        for threads, result in results.items():
            rows.append(dict(config=f"transformers generate, {threads} thread{'s' if threads > 1 else ''}", batch=batch,
                             **_figures(result, batch, reference[batch], floors[batch]),
                             agree=agreement(result["tokens"], reference[batch]["tokens"])))
            print(harness.format_table(rows[-1:], COLUMNS), flush=True)
        if args.llama_cpp is not None:
            from llamacpp_rows import run_llama_cpp
            for threads in (int(t) for t in args.transformers_threads.split(",")):
                result = run_llama_cpp(args.llama_cpp, args.gguf, batch, args.prompt_length, new_tokens, threads,
                                       args.repeats)
                rows.append(dict(config=f"llama.cpp f32, {threads} thread{'s' if threads > 1 else ''}", batch=batch,
                                 **_figures(result, batch, reference[batch], floors[batch]), agree="n/a"))
                print(harness.format_table(rows[-1:], COLUMNS), flush=True)
    gc.collect()

    from shardmesh.launcher import Launcher
    with tempfile.TemporaryDirectory(prefix="bench-topology-") as workdir:
        for name in chosen:
            mesh = mesh_configs.CONFIGS[name]
            topology_file = mesh.write(pathlib.Path(workdir) / f"{name}.toml", config)
            started = time.perf_counter()
            with harness.environment(mesh.env), \
                    Launcher(model_dir, topology_file, threads_per_service=mesh.thread_counts,
                             service_args=mesh.service_args, log_level="WARNING", no_auth=not args.auth) as launcher:
                print(f"{name}: mesh of {len(launcher.processes)} processes up in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
                for batch in batches:
                    result = run_mesh(launcher.router_address, launcher.client_token, prompts[:batch], new_tokens,
                                      args.repeats, {n: process.pid for n, process in launcher.processes.items()})
                    rows.append(dict(config=name, batch=batch, **_figures(result, batch, reference[batch], floors[batch]),
                                     agree=agreement(result["tokens"], reference[batch]["tokens"])))
                    print(harness.format_table(rows[-1:], COLUMNS), flush=True)
                    print("  CPU ms/step by process: " + ", ".join(
                        f"{n} {seconds * 1e3:.1f}" for n, seconds in result["cpu_by_process"].items()), flush=True)

    header = [f"decode throughput, {shape} shape ({config.num_layers} layers, hidden {config.hidden_size}, "
              f"{config.num_experts} experts top-{config.experts_per_token}, vocab {config.vocab_size}, fp32), "
              f"prompt {args.prompt_length} tokens, {new_tokens} new tokens per sequence",
              f"machine: {os.cpu_count()} cores, 1-min load average {load_before:.1f} before the run, "
              f"{os.getloadavg()[0]:.1f} after (other work on the machine skews every figure)",
              f"read bandwidth {bandwidth / 1e9:.1f} GB/s; floor = weight bytes per decode step / bandwidth:"]
    for batch, floor in floors.items():
        header.append(f"  batch {batch}: {floor['weight_bytes'] / 1e6:.0f} MB ({floor['experts_touched']:.2f} "
                      f"distinct experts per layer) -> {floor['floor_s'] * 1e3:.1f} ms/step, "
                      f"{batch / floor['floor_s']:.0f} tok/s")
    text = "\n".join(header) + "\n\n" + harness.format_table(rows, COLUMNS)
    print("\n" + text)
    path = harness.save(f"decode_throughput-{shape}", text, dict(rows=rows, floors=floors, bandwidth=bandwidth,
                                                                  argv=sys.argv))
    print(f"\nwritten to {path}")
    return 0


def _figures(result: dict, batch: int, reference: dict, floor: dict) -> dict:
    tokens_per_s = batch / result["tpot_s"]
    return dict(tpot_ms=result["tpot_s"] * 1e3, tokens_per_s=tokens_per_s, cpu_ms=result.get("cpu_s", 0) * 1e3,
                vs_transformers=tokens_per_s / (batch / reference["tpot_s"]),
                vs_floor=result["tpot_s"] / floor["floor_s"])


if __name__ == "__main__":
    sys.exit(main())
