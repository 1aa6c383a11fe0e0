"""The mesh on a CUDA device (marked `gpu`: skipped where torch.cuda.is_available() is False).

- fp32 on cuda:0 against transformers fp32 on cuda:0: logits within 1e-4 relative, greedy identical
  (TF32 stays off: torch's default, asserted, since TF32 matmuls are ~1e-3 relative).
- bf16 on cuda:0 against transformers bf16 on cuda:0: logits within BF16_RTOL of max|ref| at 90% of
  steps and within BF16_GROSS at all; greedy tokens equal inside the tolerance except at near-ties;
  the agreement is printed, with each step's distance to the fp32 truth. See BF16_RTOL for why.
- Mixed devices: stages and expert servers split between cuda:0 and the CPU (the router holds no
  weights), fp32, against the CPU oracle.

The reference is teacher-forced on the mesh's own tokens (one transformers forward per prompt over
prompt + generated tokens), so a near-tie cannot make the two runs diverge and every step is compared.
"""

import asyncio
import functools

import pytest
import torch

from mesh_helpers import check_against_reference, generate_staggered, local_mesh, topology
from oracle import assert_greedy_matches, tolerance, top2_margin

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 17, 33, 5, 90, 61, 7], [1, 44], [1, 8, 120, 3, 3, 77, 19, 4, 90, 11, 60], [1, 40, 9]]
MAX_NEW_TOKENS = 8
MOE_TOPOLOGY = topology([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7]])
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per operation); two implementations
# that round in different places (fused qkv / gate_up, per-sequence attention, fp32 combine here;
# separate projections and a batched eager attention in transformers) drift apart by a few of those
# steps through 4 layers with x3-scaled random weights: measured on these fixtures, bf16 both sides,
# up to 1.2e-2 of max|ref| on the CPU, all steps but one. That one (prompt 2, step 6) is 0.17 off on
# the CPU and 0.17 on an H200 (2026-11-26): layer 1's gate there has experts 7 and 5 at probabilities
# 0.1146 and 0.1137 in fp32, a margin below bf16's rounding, and our bf16 run routes to the other
# expert (its distance to the fp32 truth is 0.17, transformers' 0.012; fp32 on CUDA agrees to 1e-4).
# So: at least 90% of steps within BF16_RTOL = 3e-2 (2.5x the drift), none beyond BF16_GROSS (a
# dropped prompt token gives 0.7 at every step), greedy tokens equal inside the tolerance except at
# near-ties; the agreement and every step's distance to the fp32 truth are printed.
BF16_RTOL = 3e-2
BF16_GROSS = 0.35


REFERENCE_DEVICE = "cuda:0"


@functools.lru_cache(maxsize=4)
def cuda_reference(model_dir: str, dtype: torch.dtype):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.to(REFERENCE_DEVICE).eval()


def teacher_forced_logits(model_dir, dtype: torch.dtype, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Reference logits float32 [len(tokens), V] on CPU: the logits that chose each of `tokens`,
    from one forward over prompt + tokens (no KV cache shared with what is checked)."""
    model = cuda_reference(str(model_dir), dtype)
    ids = torch.tensor([prompt + tokens[:-1]], dtype=torch.long, device=REFERENCE_DEVICE)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().cpu()  # [P + n - 1, V]
    return logits[len(prompt) - 1:]


def run_mesh(model_dir, topo, **mesh_kwargs):
    async def main():
        async with local_mesh(model_dir, topo, **mesh_kwargs) as mesh:
            results = await generate_staggered(mesh.address, PROMPTS, MAX_NEW_TOKENS)
            return results, mesh_devices(mesh)

    return asyncio.run(asyncio.wait_for(main(), 180))


def mesh_devices(mesh) -> dict[str, set[str]]:
    """server name -> devices of every weight and KV buffer it holds (read while it still runs)."""
    found = {}
    for server in mesh.stages:
        model = server.servicer.model
        tensors = [model.embed_tokens, model.lm_head, *model.cache._buffers.values()]
        tensors += [layer.self_attn.qkv_proj.weight for layer in model.layers]
        found[server.servicer.name] = {str(t.device) for t in tensors if t is not None}
    for server in mesh.experts:
        shard = server.servicer.shard
        found[server.servicer.name] = {str(p.device) for mlp in shard._mlps.values() for p in vars(mlp).values()
                                       if isinstance(p, torch.Tensor)}
    return found


def test_tf32_is_off():
    # fp32 comparisons at 1e-4 need true fp32 matmuls; torch's default, never changed by shardmesh.
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("variant,topo", [("mixtral", MOE_TOPOLOGY), ("llama", topology([(0, 1), (1, 4)]))])
def test_mesh_on_cuda_fp32_matches_transformers_on_cuda(model_dirs, variant, topo):
    model_dir = model_dirs[variant]
    results, devices = run_mesh(model_dir, topo, device="cuda:0", dtype="float32")
    assert all(found == {"cuda:0"} for found in devices.values()), devices
    for i, (prompt, (tokens, logits)) in enumerate(zip(PROMPTS, results)):
        ref_logits = teacher_forced_logits(model_dir, torch.float32, prompt, tokens)  # [n, V]
        ref_tokens = ref_logits.argmax(-1).tolist()
        assert_greedy_matches(tokens, logits, ref_tokens, list(ref_logits), context=f"{variant} cuda fp32 prompt {i}")


def test_mesh_on_cuda_bf16_against_transformers_bf16(mixtral_dir):
    results, devices = run_mesh(mixtral_dir, MOE_TOPOLOGY, device="cuda:0")  # dtype default on CUDA: bf16
    assert all(found == {"cuda:0"} for found in devices.values()), devices
    steps, within, agree, report = 0, 0, 0, []
    for i, (prompt, (tokens, logits)) in enumerate(zip(PROMPTS, results)):
        ref_logits = teacher_forced_logits(mixtral_dir, torch.bfloat16, prompt, tokens)  # [n, V]
        truth = teacher_forced_logits(mixtral_dir, torch.float32, prompt, tokens)        # [n, V] fp32
        for step, (token, ours, ref, exact) in enumerate(zip(tokens, logits, ref_logits, truth)):
            scale = float(ref.abs().max())
            relative = float((ours - ref).abs().max()) / scale
            # How far each bf16 run is from the fp32 truth: a routing flip shows in one of them only.
            report.append(f"prompt {i} step {step}: ours-ref {relative:.3g}, ours-fp32 "
                          f"{float((ours - exact).abs().max()) / scale:.3g}, ref-fp32 {float((ref - exact).abs().max()) / scale:.3g}")
            assert relative <= BF16_GROSS, f"gross error: {report[-1]}"
            steps += 1
            within += relative <= BF16_RTOL
            if token == int(ref.argmax()):
                agree += 1
            elif relative <= BF16_RTOL:  # inside the tolerance a token may differ only at a near-tie
                assert top2_margin(ref) <= BF16_RTOL * scale, (
                    f"prompt {i} step {step}: token {token} != reference {int(ref.argmax())} with margin "
                    f"{top2_margin(ref):.3g} > {BF16_RTOL * scale:.3g}")
    print(f"bf16 on cuda: greedy agreement {agree}/{steps}; {within}/{steps} steps within {BF16_RTOL} of max|ref|;")
    print("\n".join(report))
    assert within >= 0.9 * steps, f"only {within}/{steps} steps within {BF16_RTOL} of max|ref|"


def test_mixed_devices_fp32_match_the_cpu_oracle(mixtral_dir):
    devices = {"stage-0": "cuda:0", "stage-1": "cpu", "experts-0": "cuda:0", "experts-1": "cpu"}
    results, found = run_mesh(mixtral_dir, MOE_TOPOLOGY, device="cpu", devices=devices, dtype="float32")
    assert found == {name: {device} for name, device in devices.items()}, found
    check_against_reference(mixtral_dir, PROMPTS, results, MAX_NEW_TOKENS, "mixed cuda/cpu fp32")


def test_checkpoint_reader_loads_onto_cuda(mixtral_dir):
    from shardmesh.checkpoint import CheckpointReader

    reader = CheckpointReader(mixtral_dir, device="cuda:0")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensor = reader.get(key, torch.bfloat16)
    assert tensor.device == torch.device("cuda:0") and tensor.dtype == torch.bfloat16
    assert torch.equal(tensor.cpu(), CheckpointReader(mixtral_dir).get(key).to(torch.bfloat16))
