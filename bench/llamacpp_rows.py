"""llama.cpp's decode throughput on the same checkpoint, for bench/decode_throughput.py's table.

llama.cpp is not part of this project: bring your own build (its `llama-batched-bench`) and the
checkpoint converted to an f32 GGUF with llama.cpp's convert_hf_to_gguf.py, then

    .venv/bin/python bench/decode_throughput.py --llama-cpp path/to/llama.cpp/build/bin \
        --gguf path/to/model-f32.gguf

(The seeded benchmark checkpoints carry no sentencepiece model: converting one needs a placeholder
vocabulary of the right size; llama-batched-bench decodes random token ids, so only the size counts.)

llama-batched-bench decodes `batch` sequences of `prompt` tokens then `new_tokens` tokens each, all
sequences in one llama_decode per step (its default pattern), which is the workload of the mesh
rows: its time per output token is the decode time / new_tokens. Its tokens are random ids, so
no "same tokens" check is possible here. The CPU time is that of the llama.cpp process.
"""

import json
import pathlib
import resource
import subprocess


def run_llama_cpp(bin_dir: pathlib.Path, gguf: pathlib.Path, batch: int, prompt: int, new_tokens: int,
                  threads: int, repeats: int) -> dict:
    """The best of `repeats` runs: dict(tpot_s=seconds per decode step, cpu_s=CPU seconds per step)."""
    command = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-c", str(max(2048, batch * (prompt + new_tokens))),
               "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(new_tokens), "-npl", str(batch),
               "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
    best = dict(tpot_s=float("inf"), cpu_s=float("nan"))
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode:
            raise RuntimeError(f"llama-batched-bench failed ({done.returncode}): {done.stderr[-2000:]}")
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith('{"n_kv_max"')]
        record = json.loads(lines[-1])
        tpot = record["t_tg"] / new_tokens
        if tpot < best["tpot_s"]:
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            # The whole run's CPU (load, prefill, decode) over the decode steps: an upper bound per step.
            best = dict(tpot_s=tpot, cpu_s=cpu / new_tokens)
    return best
