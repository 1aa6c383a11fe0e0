"""Decode throughput on one device: transformers in one process against the mesh (every service
in this process, on the same device, talking over real loopback gRPC) and the same mesh as
processes (`shardmesh up`: stage <-> expert tensors cross processes, through the CUDA IPC plane on
CUDA; --no-processes leaves it out), each also against the memory-bandwidth floor of that device
measured in the same run.

    python bench/gpu_throughput.py --device cuda:0          # Mixtral-shaped, ~3.6 GB of bf16 weights
    python bench/gpu_throughput.py --device cpu --tiny      # a smoke run of the whole script

Per system and batch size B: decode tokens/s (all sequences together) and time per output token
(one decode step: every sequence gets one token). Prefill and the first `--warmup` steps are not
timed. The floor of a step is the weight bytes it must read (seeded_mixtral.weight_bytes_per_step)
divided by the device-to-device copy bandwidth (bytes read + written per second); `floor / step`
is the fraction of that floor reached (1.0 = bandwidth-bound at copy speed). Writes a markdown
table to $OUT/gpu_throughput.md, else bench/results/gpu_throughput.md.
"""

import argparse
import asyncio
import contextlib
import os
import pathlib
import sys
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import gpu_profile  # noqa: E402  (bench/ is not a package)
import seeded_mixtral  # noqa: E402


PROFILE_STEPS = 8  # decode steps profiled per system (--profile)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def copy_bandwidth(device: str, num_bytes: int, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of `num_bytes`."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * num_bytes * repeats / (time.perf_counter() - start)


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=generator).tolist()


def load_transformers(model_dir: pathlib.Path, device: str, dtype: torch.dtype):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import accelerate  # noqa: F401  (transformers needs it for device_map: straight to the device)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device)
    except ImportError:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


def time_transformers(model, device: str, prompts: list[list[int]], steps: int, warmup: int) -> float:
    """Seconds per decode step of the whole batch (greedy, one KV cache, no sampling overhead)."""
    input_ids = torch.tensor(prompts, device=device)  # [B, P]
    with torch.no_grad():
        output = model(input_ids=input_ids, use_cache=True)
        for step in range(warmup + steps):
            if step == warmup:
                synchronize(device)
                start = time.perf_counter()
            next_ids = output.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            output = model(input_ids=next_ids, past_key_values=output.past_key_values, use_cache=True)
        synchronize(device)
    return (time.perf_counter() - start) / steps


async def time_mesh(address: str, prompts: list[list[int]], steps: int, warmup: int) -> float:
    """Seconds per decode step of the whole batch, from token arrival times at the client: per
    sequence, (arrival of its last token - arrival of its token `warmup`) / tokens in between; the
    median over sequences (requests that join one or two steps apart barely move it)."""
    import statistics

    from shardmesh.client import AsyncClient

    arrivals: list[list[float]] = [[] for _ in prompts]
    async with AsyncClient(address, timeout=600) as client:
        async def one(i: int) -> None:
            async with client.generate(prompts[i], max_new_tokens=warmup + steps + 1, ignore_eos=True) as stream:
                async for _ in stream:
                    arrivals[i].append(time.perf_counter())

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return statistics.median((a[-1] - a[warmup]) / (len(a) - 1 - warmup) for a in arrivals)


async def run_mesh(model_dir, device: str, dtype: str, batches, prompt_length: int, steps: int, warmup: int,
                   vocab_size: int, stages: int, expert_servers: int, profiles: list[str] | None = None
                   ) -> tuple[dict[int, float], float, str]:
    from shardmesh.config import ModelConfig
    from shardmesh.local_mesh import start_local_mesh
    from shardmesh.topology import Topology

    topology = Topology.default(ModelConfig.from_dir(model_dir), stages, expert_servers)
    began = time.perf_counter()
    mesh = await start_local_mesh(model_dir, topology, device=device, dtype=dtype, ready_timeout=300)
    load_s = time.perf_counter() - began
    # Every service shares this process's event loop, so one long step (a batch-32 prefill on a busy
    # CPU) delays the experts' health answers past the router's probe deadline and the router drops
    # them (router/expert_health.py); liveness is not what is measured here: no probes.
    prober = getattr(mesh.router.state, "expert_prober", None)
    if prober is not None:
        await prober.stop()
        mesh.router.state.expert_prober = None
    try:
        seconds = {}
        for batch in batches:
            with gpu_profile.ClockSampler() as clocks:
                seconds[batch] = await time_mesh(mesh.address, random_prompts(batch, prompt_length, vocab_size, batch),
                                                 steps, warmup)
            log(f"mesh batch {batch}: {seconds[batch] * 1e3:.2f} ms per step")
            seconds[batch] = (seconds[batch], clocks.summary(), clocks.cpu_seconds / (steps + warmup + 1))
        if profiles is not None:
            prompts = random_prompts(1, prompt_length, vocab_size, 1)
            with gpu_profile.Recorder() as recorder:
                await time_mesh(mesh.address, prompts, PROFILE_STEPS, 2)
            with gpu_profile.StackSampler(all_threads=True) as stacks:
                await time_mesh(mesh.address, prompts, PROFILE_STEPS, 2)
            profiles.append(stacks.table(f"mesh in one process, batch 1, prefill + 2 + {PROFILE_STEPS} steps", 30))
            profiles.append(recorder.table(f"mesh in one process, batch 1, prefill + 2 + {PROFILE_STEPS} steps", PROFILE_STEPS + 3))
    finally:
        await mesh.stop()
    shape = f"{len(topology.stages)} stages, {len(topology.expert_servers)} expert servers"
    return seconds, load_s, shape


def run_mesh_processes(model_dir, device: str, dtype: str, batches, prompt_length: int, steps: int, warmup: int,
                       vocab_size: int, stages: int, expert_servers: int, cuda_ipc: bool = True
                       ) -> tuple[dict[int, float], float, str]:
    """The same mesh as processes (`shardmesh up`): every stage <-> expert call crosses processes, on
    CUDA through the CUDA IPC plane (device memory both map), or with `cuda_ipc` False through host
    shared memory (SHARDMESH_CUDA_IPC=off). The shape string says how many stage sessions got a CUDA
    IPC segment (read from the stages' logs)."""
    os.environ["SHARDMESH_CUDA_IPC"] = "on" if cuda_ipc else "off"  # the services inherit it
    from shardmesh.config import ModelConfig
    from shardmesh.launcher import Launcher
    from shardmesh.topology import Topology

    topology_file = pathlib.Path(model_dir).parent / "topology.toml"
    topology_file.write_text(Topology.default(ModelConfig.from_dir(model_dir), stages, expert_servers).to_toml())
    began = time.perf_counter()
    with Launcher(model_dir, topology_file, device=device, dtype=dtype, no_auth=True, ready_timeout=180,
                  log_level="INFO") as launcher:
        load_s = time.perf_counter() - began
        seconds = {}
        for batch in batches:
            with gpu_profile.ClockSampler(process.pid for process in launcher.processes.values()) as clocks:
                seconds[batch] = asyncio.run(time_mesh(launcher.router_address, random_prompts(
                    batch, prompt_length, vocab_size, batch), steps, warmup))
            log(f"mesh (processes) batch {batch}: {seconds[batch] * 1e3:.2f} ms per step")
            seconds[batch] = (seconds[batch], clocks.summary(), clocks.cpu_seconds / (steps + warmup + 1))
        logs = [launcher.workdir / f"stage-{i}.log" for i in range(stages)]
        cuda = sum(path.read_text(errors="replace").count("and a CUDA IPC segment") for path in logs if path.exists())
        host = sum(path.read_text(errors="replace").count("shared-memory plane with a") for path in logs
                   if path.exists()) - cuda
    return seconds, load_s, f"processes, stage-expert sessions: {cuda} CUDA IPC, {host} host shm"


OUT_DIR = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"


def write_text(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def table(rows, floor_s, device_name: str) -> str:
    """rows: (system, batch, seconds per step, SM clock summary or '', host CPU seconds per step)."""
    clocks = any(clock for _, _, _, clock, _ in rows)
    lines = ["| system | batch | decode tokens/s | ms per output token | floor ms | floor / measured | vs transformers "
             "| host CPU ms per step |" + (" SM MHz (GPU busy) |" if clocks else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if clocks else "")]
    for system, batch, seconds, clock, cpu in rows:
        baseline = next(s for name, b, s, *_ in rows if name == "transformers" and b == batch)
        lines.append(f"| {system} | {batch} | {batch / seconds:,.1f} | {seconds * 1e3:.2f} | {floor_s[batch] * 1e3:.3f} "
                     f"| {floor_s[batch] / seconds:.3f} | {baseline / seconds:.2f}x | {cpu * 1e3:.1f} |"
                     + (f" {clock} |" if clocks else ""))
    return "\n".join(lines)


def write_report(header: list[str], starts: list[str], rows, floor_s, device_name: str) -> str:
    report = "\n".join([*header, f"- {'; '.join(starts)}", "", table(rows, floor_s, device_name), ""])
    write_text(OUT_DIR / "gpu_throughput.md", report)
    return report


def main(argv=None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="", choices=["", "float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: a smoke run of the script")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per measurement")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--expert-servers", type=int, default=2)
    parser.add_argument("--workdir", type=pathlib.Path, help="where the checkpoint goes (default: a temp dir)")
    parser.add_argument("--processes", action=argparse.BooleanOptionalAction, default=True,
                        help="also the mesh as processes (CUDA IPC between them on CUDA; default on)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="also profile batch-1 steps of transformers and the in-process mesh (CPU side, "
                             "torch.profiler) and time a kernel launch; writes gpu_profile.md (default on)")
    parser.add_argument("--mps", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, also the processes with CUDA IPC under an NVIDIA MPS daemon (default on)")
    parser.add_argument("--processes-after-s", type=float, default=120.0,
                        help="skip the mesh as processes when this many seconds have passed (default %(default)s)")
    args = parser.parse_args(argv)

    from shardmesh.service_config import DTYPES, check_device, default_dtype

    device = check_device(args.device)
    dtype_name = args.dtype or default_dtype(device)
    dtype = DTYPES[dtype_name]
    shape = seeded_mixtral.TINY if args.tiny else seeded_mixtral.MixtralShape(num_hidden_layers=args.layers)
    batches = [int(b) for b in args.batches.split(",")]
    device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    log(f"device {device} ({device_name}), {dtype_name}, torch {torch.__version__}, {shape}")

    bandwidth = copy_bandwidth(device, (1 << 30) if device.startswith("cuda") else (64 << 20))
    log(f"device-to-device copy: {bandwidth / 1e12:.3f} TB/s (read + written)")
    profiles = [] if args.profile else None
    if args.profile and device.startswith("cuda"):
        queued, synced = gpu_profile.launch_cost(device)
        profiles.append(f"# Where batch-1 steps go on {device_name}\n\n- one-element add: {queued * 1e6:.1f} us "
                        f"per queued launch, {synced * 1e6:.1f} us launched and waited for\n")
        log(profiles[-1].splitlines()[-1])
    element_size = torch.empty((), dtype=dtype).element_size()
    floor_s = {b: seeded_mixtral.weight_bytes_per_step(shape, b, element_size) / bandwidth for b in batches}

    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="shardmesh-bench-"))
    began = time.perf_counter()
    model_dir = seeded_mixtral.build(workdir / "model", shape, device=device, dtype=dtype)
    weight_gb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e9
    build_s = time.perf_counter() - began
    log(f"checkpoint: {weight_gb:.2f} GB in {build_s:.1f} s at {model_dir}")

    rows = []
    began = time.perf_counter()
    model = load_transformers(model_dir, device, dtype)
    hf_load_s = time.perf_counter() - began
    for batch in batches:
        with gpu_profile.ClockSampler() as clocks:
            seconds = time_transformers(model, device, random_prompts(batch, args.prompt_length, shape.vocab_size,
                                                                      batch), args.steps, args.warmup)
        rows.append(("transformers", batch, seconds, clocks.summary(), clocks.cpu_seconds / (args.steps + args.warmup + 1)))
        log(f"transformers batch {batch}: {seconds * 1e3:.2f} ms per step")
    if profiles is not None:
        prompts = random_prompts(1, args.prompt_length, shape.vocab_size, 1)
        with gpu_profile.Recorder() as recorder:
            time_transformers(model, device, prompts, PROFILE_STEPS, 0)
        profiles.append(recorder.table(f"transformers, batch 1, prefill + {PROFILE_STEPS} steps",
                                       PROFILE_STEPS + 1))
        with gpu_profile.StackSampler() as stacks:
            time_transformers(model, device, prompts, PROFILE_STEPS, 0)
        profiles.append(stacks.table(f"transformers, batch 1, prefill + {PROFILE_STEPS} steps"))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    mesh_seconds, mesh_load_s, mesh_shape = asyncio.run(run_mesh(
        model_dir, device, dtype_name, batches, args.prompt_length, args.steps, args.warmup, shape.vocab_size,
        args.stages, args.expert_servers, profiles))
    if profiles:
        write_text(OUT_DIR / "gpu_profile.md", "\n".join(profiles))
    rows += [(f"mesh ({mesh_shape}, one process: host shm plane)", b, *s) for b, s in mesh_seconds.items()]
    starts = [f"transformers load {hf_load_s:.1f} s", f"mesh start {mesh_load_s:.1f} s"]
    header = [
        f"# Decode throughput on {device_name} ({device}), {dtype_name}",
        "",
        f"- model: seeded Mixtral shape, hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, "
        f"{shape.num_hidden_layers} layers, {shape.num_local_experts} experts top-{shape.num_experts_per_tok}, "
        f"vocab {shape.vocab_size}: {weight_gb:.2f} GB of weights (built in {build_s:.1f} s)",
        f"- device-to-device copy bandwidth (read + written): {bandwidth / 1e12:.3f} TB/s; floor = weight bytes "
        f"a step reads / that bandwidth ({', '.join(f'batch {b}: {seeded_mixtral.weight_bytes_per_step(shape, b, element_size) / 1e9:.2f} GB' for b in batches)})",
        f"- prompt {args.prompt_length} tokens, {args.warmup} untimed then {args.steps} timed decode steps; torch {torch.__version__}",
        "- host CPU ms per step: user + system CPU of this process (and, for the processes rows, of every service "
        "process) over the whole request (prefill, warm-up and timed steps) / its decode steps; SM MHz (GPU busy): "
        "medians of nvidia-smi samples every 100 ms while the rows ran",
        f"- command: `python bench/gpu_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
    ]
    write_report(header, starts, rows, floor_s, device_name)  # now, in case the processes run out of time
    if args.processes and time.perf_counter() - started > args.processes_after_s:
        starts.append(f"mesh as processes skipped: {time.perf_counter() - started:.0f} s had passed "
                      f"(> --processes-after-s {args.processes_after_s:.0f})")
    elif args.processes:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        cuda = device.startswith("cuda")
        for cuda_ipc, mps in [(True, False), (False, False), (True, True)][:(3 if cuda and args.mps else 2 if cuda else 1)]:
            with (gpu_profile.MpsDaemon() if mps else contextlib.nullcontext()) as daemon:
                if mps and daemon.error:
                    starts.append(f"MPS not tried: {daemon.error}")
                    continue
                try:
                    process_seconds, process_load_s, process_shape = run_mesh_processes(
                        model_dir, device, dtype_name, batches, args.prompt_length, args.steps, args.warmup,
                        shape.vocab_size, args.stages, args.expert_servers, cuda_ipc)
                except Exception as error:  # noqa: BLE001  (MPS on a machine that refuses it: say so, go on)
                    if not mps:
                        raise
                    starts.append(f"mesh as processes under MPS failed: {type(error).__name__}: {error}")
                    continue
            label = f"mesh ({mesh_shape}, {process_shape}{', MPS' if mps else ''})"
            rows += [(label, b, *s) for b, s in process_seconds.items()]
            starts.append(f"mesh as processes{' under MPS' if mps else ''} start {process_load_s:.1f} s")
            write_report(header, starts, rows, floor_s, device_name)
    print(write_report(header, starts, rows, floor_s, device_name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
