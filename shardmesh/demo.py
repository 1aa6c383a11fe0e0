"""`shardmesh demo`: the main job, end to end on loopback.

Makes a small seeded Mixtral-family checkpoint (with its own tokenizer) unless one is given,
starts a mesh of real processes (router, two stages, two expert servers sharing one expert),
streams a few concurrent generations through the client SDK, checks the tokens against
transformers, and stops the mesh."""

import pathlib
import sys
import threading
import time

from shardmesh.client import Client
from shardmesh.launcher import Launcher, ServiceFailed

PROMPTS = [
    "The mesh splits a model",
    "Experts live on their own servers, and",
    "A router streams",
]


def _stream(client: Client, index: int, prompt: str, max_new_tokens: int, results: dict, lock: threading.Lock):
    tokens = []
    try:
        for token in client.generate(prompt, max_new_tokens=max_new_tokens):
            tokens.append(token)
            with lock:
                print(f"  [{index}] +{token.token_id:<5d} {token.text!r}", flush=True)
    except Exception as error:  # reported below, the other streams go on
        results[index] = error
        return
    results[index] = tokens


def run_demo(model_dir: pathlib.Path | None, max_new_tokens: int = 16) -> int:
    if model_dir is None:
        model_dir = pathlib.Path("demo-model")
        if not (model_dir / "config.json").exists():
            from shardmesh.checkpoint_maker import DEMO_CONFIG, make_checkpoint
            print(f"making a seeded demo checkpoint in {model_dir}/", flush=True)
            make_checkpoint(model_dir, **DEMO_CONFIG, progress=lambda m: print(f"  {m}", flush=True))
    print(f"starting the mesh for {model_dir}/ ...", flush=True)
    started = time.monotonic()
    try:
        launcher = Launcher(model_dir, progress=lambda m: print(f"  {m}", flush=True)).__enter__()
    except ServiceFailed as error:
        print(f"error: the mesh did not start: {error}", file=sys.stderr)
        return 1
    try:
        topology = launcher.topology
        print(f"mesh SERVING at {launcher.router_address} after {time.monotonic() - started:.1f} s:", flush=True)
        for stage in topology.stages:
            print(f"  {stage.name}: layers [{stage.start_layer}, {stage.end_layer})")
        replicated = sorted({e for (_, e), names in topology.replicas().items() if len(names) > 1})
        for spec in topology.expert_servers:
            print(f"  {spec.name}: experts {sorted({e for _, e in spec.experts})} of every layer")
        print(f"  replicated experts: {replicated}", flush=True)
        results: dict[int, object] = {}
        lock = threading.Lock()
        with Client(launcher.router_address, timeout=120, token=launcher.client_token) as client:
            threads = [threading.Thread(target=_stream, args=(client, i, p, max_new_tokens, results, lock))
                       for i, p in enumerate(PROMPTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        launcher.__exit__(None, None, None)
    print("mesh stopped", flush=True)
    return _check(model_dir, results, max_new_tokens)


def _check(model_dir: pathlib.Path, results: dict, max_new_tokens: int) -> int:
    from shardmesh.reference import transformers_greedy
    from shardmesh.text import TextCodec

    print("running transformers on the same checkpoint ...", flush=True)
    text = TextCodec.from_model_dir(model_dir)
    same = 0
    for index, prompt in enumerate(PROMPTS):
        outcome = results.get(index)
        if isinstance(outcome, Exception) or outcome is None:
            print(f"  [{index}] failed: {outcome}")
            continue
        ours = [t.token_id for t in outcome]
        expected = transformers_greedy(model_dir, text.encode(prompt), max_new_tokens)
        print(f"  [{index}] {prompt!r} -> {''.join(t.text for t in outcome)!r}")
        if ours == expected:
            same += 1
        else:
            print(f"  [{index}] differs: mesh {ours} vs transformers {expected}")
    ok = same == len(PROMPTS)
    print(f"check: {same}/{len(PROMPTS)} generations identical to transformers (greedy, fp32): "
          f"{'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1
