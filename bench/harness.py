"""What the benchmarks share: the seeded checkpoints (built once into a cache directory), the
memory-bandwidth probe and the floor it gives, topology files, and the results table.

Benchmarks are not tests: they print ratios against baselines measured in the same run.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import sys
import time

import torch

# The shape: Mixtral, 567 MB of fp32 weights. MHA (8 heads of 64) as in the figures.
SHAPES = {
    "default": dict(family="mixtral", vocab_size=32000, hidden_size=512, intermediate_size=1024,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512),
    "small": dict(family="mixtral", vocab_size=4096, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512),
}
RESULTS_DIR = pathlib.Path(__file__).parent / "results"
DEFAULT_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "shardmesh-bench"


def checkpoint(shape: str, cache_dir: pathlib.Path = DEFAULT_CACHE, seed: int = 0) -> pathlib.Path:
    """The seeded checkpoint of `shape`, built with make_checkpoint on first use and reused after."""
    from shardmesh.checkpoint_maker import make_checkpoint

    spec = SHAPES[shape]
    key = "-".join(f"{k}{v}" for k, v in sorted(spec.items()) if k != "family")
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    out_dir = pathlib.Path(cache_dir) / f"{spec['family']}-{shape}-seed{seed}-{digest}"
    if (out_dir / "COMPLETE").exists():
        return out_dir
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"building the {shape} checkpoint in {out_dir} (once)", flush=True)
    make_checkpoint(partial, seed=seed, **spec)
    (partial / "COMPLETE").write_text(json.dumps(spec))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def load_transformers(model_dir: pathlib.Path):
    """transformers' model of the checkpoint, fp32, eval, as a user of `generate` would load it."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 7) -> float:
    """Bytes/s of reading a tensor far larger than the caches, all threads: the best of a sum and of
    a matrix-vector product (what a decode step does) over `repeats` tries each."""
    data = torch.ones(nbytes // 4, dtype=torch.float32)
    matrix, vector = data.view(-1, 4096), torch.ones(1, 4096)
    data.sum()  # fault the pages in
    best = float("inf")
    for read in (data.sum, lambda: torch.nn.functional.linear(vector, matrix)):
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return nbytes / best


def cpu_seconds(pids) -> float:
    """User + system CPU seconds used so far by these processes (Linux /proc; this process if none)."""
    if not pids:
        times = os.times()
        return times.user + times.system
    total = 0
    for pid in pids:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """Set these environment variables while the block runs (processes started in it inherit them)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def tensor_bytes(model_dir: pathlib.Path) -> dict[str, int]:
    """Name -> bytes of every weight as served (float32)."""
    from safetensors import safe_open

    sizes = {}
    for path in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                sizes[name] = 4 * count
    return sizes


def weight_bytes_per_step(model_dir: pathlib.Path, batch: int, experts_touched: float) -> float:
    """Weight bytes one decode step must read: every non-expert weight once (the embedding only
    `batch` rows), plus `experts_touched` (distinct experts per layer, averaged) experts per layer."""
    from shardmesh.config import ModelConfig

    config = ModelConfig.from_dir(model_dir)
    sizes = tensor_bytes(model_dir)
    expert_bytes = sum(v for k, v in sizes.items() if ".experts.0." in k and k.startswith("model.layers.0."))
    dense = sum(v for k, v in sizes.items() if ".experts." not in k and "embed_tokens" not in k)
    embed_rows = batch * config.hidden_size * 4
    return dense + embed_rows + config.num_layers * experts_touched * expert_bytes


def write_topology(path: pathlib.Path, num_layers: int, stages: list[tuple[int, int]],
                   expert_servers: list[tuple[list[int], tuple[int, int]]]) -> pathlib.Path:
    """stages as (start, end); expert_servers as (expert ids, (first layer, end layer))."""
    lines = []
    for i, (start, end) in enumerate(stages):
        lines += ["[[stage]]", f'name = "stage-{i}"', f"layers = [{start}, {end}]", ""]
    for i, (experts, (start, end)) in enumerate(expert_servers):
        lines += ["[[expert_server]]", f'name = "experts-{i}"', f"experts = {list(experts)}",
                  f"layers = [{start}, {end}]", ""]
    path.write_text("\n".join(lines))
    return path


def wait_for_ports(port_files: list[pathlib.Path], processes: list, what: str, timeout_s: float = 300) -> list[int]:
    """The ports the started `processes` wrote to `port_files`; RuntimeError naming `what` when one
    exits first or they take longer than `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not all(f.exists() for f in port_files):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise RuntimeError(f"{what}: shard servers did not start")
        time.sleep(0.1)
    return [int(f.read_text()) for f in port_files]


def mean_interval(timestamps: list[float], skip: int = 2) -> tuple[float, int]:
    """Mean gap between consecutive timestamps after the first `skip` (prefill, warm-up); (s, gaps)."""
    gaps = [b - a for a, b in zip(timestamps[skip:], timestamps[skip + 1:])]
    return (statistics.fmean(gaps) if gaps else float("nan")), len(gaps)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of dicts -> a fixed-width text table with the given (key, header) columns."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_format(row.get(key)) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def save(name: str, text: str, data: object) -> pathlib.Path:
    """Write the table (name.txt) and the raw figures (name.json) under bench/results/."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS_DIR / f"{name}-{stamp}.txt").write_text(text + "\n")
    (RESULTS_DIR / f"{name}-{stamp}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return RESULTS_DIR / f"{name}-{stamp}.txt"


def report(name: str, header: str, rows: list[dict], columns: list[tuple[str, str]]) -> pathlib.Path:
    """Print header + table, save both with the rows and this run's argv (`save`), print where."""
    text = header + "\n\n" + format_table(rows, columns)
    print(text)
    path = save(name, text, dict(rows=rows, argv=sys.argv))
    print(f"\nwritten to {path}")
    return path


def alternate_trees(tree_a: pathlib.Path, tree_b: pathlib.Path, rounds: int, run_side) -> dict[str, list[dict]]:
    """`run_side(tree)` -> {figure: value} for each tree, `rounds` times, A B then B A (slow minutes
    hit both sides), each round printed with the load; returns {"A": [figures...], "B": [...]}."""
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for round_index in range(rounds):
        for side in ("A", "B") if round_index % 2 == 0 else ("B", "A"):
            figures = run_side(tree_a if side == "A" else tree_b)
            results[side].append(figures)
            print(f"round {round_index + 1} {side}: " + ", ".join(f"{k} {v:.0f}" for k, v in figures.items())
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    return results


def print_medians(results: dict[str, list[dict]], figures: list[str], width: int = 16) -> None:
    """Each figure's median over the rounds of A and of B (alternate_trees) and B / A."""
    for figure in figures:
        a, b = (statistics.median(r[figure] for r in results[side]) for side in "AB")
        print(f"  {figure:{width}s} A {a:7.0f}  B {b:7.0f}  B / A {b / a:.2f}")
