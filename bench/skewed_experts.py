"""Skewed expert load before and after a live rebalance, measured in one run.

    .venv/bin/python bench/skewed_experts.py [--sequences 32] [--new-tokens 32] [--rounds 3]

A seeded Mixtral (4 layers, 8 experts, top-2, hidden 256, experts 1024 wide) whose gates are
biased so that most tokens go to experts 0 and 1 of every layer (see `skewed_checkpoint`). The mesh runs as real processes
(`Launcher`, one torch thread each): two stages, three expert servers, and experts-a holds
experts 0-2 of every layer, so it gets both hot experts. Each round runs `--sequences` concurrent
greedy generations; the baseline rounds run on that placement, then `Admin.Rebalance` re-places
experts live (the EPLB-style planner replicates the hot ones), then the same rounds run again.
Prints, per phase, the busiest expert server's share of the routed tokens and its seconds spent
computing (from each server's GetExpertLoad counters: the critical path of every MoE layer when
cores are free), the mesh's decode tokens/s (median of the rounds), their ratios, and checks that
both phases generated the same tokens. Tokens/s only gains where the expert servers have cores
of their own: on a machine with fewer free cores than services, the work just moves between them.
"""

import argparse
import asyncio
import os
import pathlib
import shutil
import statistics
import sys
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from shardmesh import grpc_util  # noqa: E402
from shardmesh.client import AsyncClient  # noqa: E402
from shardmesh.launcher import Launcher  # noqa: E402
from shardmesh.v1 import admin_pb2, admin_pb2_grpc, expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc  # noqa: E402

SHAPE = dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
HOT = (0, 1)
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "shardmesh-bench"
TOPOLOGY = """
[[stage]]
name = "stage-0"
layers = [0, 2]

[[stage]]
name = "stage-1"
layers = [2, 4]

[[expert_server]]
name = "experts-a"
experts = [0, 1, 2]

[[expert_server]]
name = "experts-b"
experts = [3, 4, 5]

[[expert_server]]
name = "experts-c"
experts = [6, 7]
"""


def skewed_checkpoint(strength: float) -> pathlib.Path:
    """The seeded checkpoint made to send most tokens to experts HOT: hidden dimension 0 of every
    token's embedding is set to one constant (a feature every token carries, so the gates' inputs
    share a component of one sign), then HOT's gate rows get a weight on that dimension worth
    `strength` typical logits."""
    from shardmesh.checkpoint_maker import make_checkpoint

    out = CACHE / f"mixtral-skewed-{strength:g}"
    if (out / "COMPLETE").exists():
        return out
    base = CACHE / "mixtral-skew-base"
    if not (base / "COMPLETE").exists():
        shutil.rmtree(base, ignore_errors=True)
        make_checkpoint(base, seed=0, **SHAPE)
        (base / "COMPLETE").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    (path,) = out.glob("*.safetensors")
    tensors = load_file(path)
    embed = tensors["model.embed_tokens.weight"]                                # [V, H]
    embed[:, 0] = 30 * embed.std()
    save_file(tensors, path, metadata={"format": "pt"})

    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.gate.register_forward_pre_hook(
        lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=torch.randint(3, SHAPE["vocab_size"], (8, 64), generator=torch.Generator().manual_seed(1)))
    for hook in hooks:
        hook.remove()
    for layer, x in inputs.items():                                            # x [T, H]
        gate = tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"]   # [E, H]
        spread = (x @ gate.T).std().item()                                     # typical logit size
        for expert in HOT:
            gate[expert, 0] += strength * spread / x[:, 0].mean().item()
    save_file(tensors, path, metadata={"format": "pt"})
    (out / "COMPLETE").write_text("")
    return out


async def expert_counters(addresses: list[str]) -> dict[str, tuple[int, float]]:
    """(tokens computed, seconds spent computing) of each expert server since it started."""
    counts = {}
    for address in addresses:
        async with grpc_util.insecure_channel(address) as channel:
            report = await expert_pb2_grpc.ExpertStub(channel).GetExpertLoad(expert_pb2.GetExpertLoadRequest(), timeout=30)
        counts[address] = (sum(t.tokens for t in report.tokens), report.busy_seconds)
    return counts


async def one_round(address: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Concurrent greedy generations; (decode tokens/s after every stream's first token, tokens)."""
    firsts, outputs = [], []
    async with AsyncClient(address, timeout=600) as client:
        async def one(prompt):
            tokens = []
            async for token in client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True):
                if not tokens:
                    firsts.append(time.perf_counter())
                tokens.append(token.token_id)
            return tokens

        outputs = await asyncio.gather(*(one(p) for p in prompts))
    end = time.perf_counter()
    return len(prompts) * (new_tokens - 1) / (end - max(firsts)), outputs


async def phase(address: str, servers: list[str], prompts, new_tokens: int, rounds: int) -> dict:
    before = await expert_counters(servers)
    rates, outputs = [], None
    for _ in range(rounds):
        rate, outputs = await one_round(address, prompts, new_tokens)
        rates.append(rate)
    after = await expert_counters(servers)
    tokens = {a: after[a][0] - before[a][0] for a in servers}
    busy = {a: after[a][1] - before[a][1] for a in servers}
    return dict(tokens_per_s=statistics.median(rates), rates=rates, busiest_share=max(tokens.values()) / sum(tokens.values()),
                server_tokens=tokens, busiest_busy_s=max(busy.values()), total_busy_s=sum(busy.values()), outputs=outputs)


async def measure(address: str, args) -> dict:
    async with grpc_util.insecure_channel(address) as channel:
        status = await router_pb2_grpc.RouterStub(channel).GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=30)
        servers = [a for s in status.servers if s.role == router_pb2.SERVER_ROLE_EXPERT for a in s.replica_addresses or [s.address]]
        generator = torch.Generator().manual_seed(7)
        prompts = [torch.randint(3, SHAPE["vocab_size"], (args.prompt_tokens,), generator=generator).tolist()
                   for _ in range(args.sequences)]
        await one_round(address, prompts[:2], 4)  # warm-up
        before = await phase(address, servers, prompts, args.new_tokens, args.rounds)
        reply = await admin_pb2_grpc.AdminStub(channel).Rebalance(admin_pb2.RebalanceRequest(
            load_window_seconds=600, slots_per_server=args.slots), timeout=600)
        await one_round(address, prompts[:2], 4)  # warm the new placement's channels
        after = await phase(address, servers, prompts, args.new_tokens, args.rounds)
    names = {a: s.name for s in status.servers for a in s.replica_addresses or [s.address]}
    return dict(before=before, after=after, rebalance=reply, names=names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=16, help="expert replicas per server for the plan")
    parser.add_argument("--strength", type=float, default=6.0, help="hot gate rows' push, in logit standard deviations")
    args = parser.parse_args()
    model_dir = skewed_checkpoint(args.strength)
    workdir = CACHE / "skewed-topology.toml"
    workdir.write_text(TOPOLOGY)
    with Launcher(model_dir, workdir, threads_per_service=1, no_auth=True) as launcher:
        result = asyncio.run(measure(launcher.router_address, args))
    before, after, reply = result["before"], result["after"], result["rebalance"]
    print(f"skewed Mixtral (hot experts {HOT} of 8, top-2), {args.sequences} sequences x {args.new_tokens} tokens, "
          f"{args.rounds} rounds per phase, processes with 1 torch thread each, {os.cpu_count()} CPUs")
    for label, data in (("before", before), ("after", after)):
        split = ", ".join(f"{result['names'].get(a, a)} {n}" for a, n in data["server_tokens"].items())
        print(f"  {label:<6} busiest expert server's share {data['busiest_share']:.3f} (even: {1 / 3:.3f}); "
              f"decode {data['tokens_per_s']:.1f} tokens/s (rounds {', '.join(f'{r:.1f}' for r in data['rates'])}); "
              f"tokens per server: {split}; busiest server computed {data['busiest_busy_s']:.2f} s "
              f"of {data['total_busy_s']:.2f} s")
    print(f"  rebalance: {reply.seconds:.2f} s, planned imbalance {reply.imbalance_before:.2f} -> {reply.imbalance_after:.2f}, "
          f"{sum(len(e.experts) for e in reply.loaded)} replicas loaded, {sum(len(e.experts) for e in reply.dropped)} dropped")
    print(f"  ratio after/before: busiest share {after['busiest_share'] / before['busiest_share']:.2f}, "
          f"busiest server's compute seconds {after['busiest_busy_s'] / before['busiest_busy_s']:.2f}, "
          f"tokens/s {after['tokens_per_s'] / before['tokens_per_s']:.2f}")
    same = after["outputs"] == before["outputs"]
    print(f"  same tokens before and after: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
