"""The numerical oracle: Hugging Face transformers' own implementation, fp32, on the same checkpoint.

    tokens, step_logits = reference_greedy(model_dir, prompt_ids, max_new_tokens)
    assert_logits_close(ours, ref)                       # max|ours - ref| <= rtol * max|ref|
    notes = assert_greedy_matches(our_tokens, our_logits, tokens, step_logits)

Greedy tokens must be identical wherever the reference's top-two margin is larger than the
tolerance; a disagreement at a near-tie is reported (warning + returned note), never hidden by
loosening the tolerance, and ends the comparison of that sequence (its prefixes differ after it).
transformers is imported lazily; models are cached per directory.
"""

import functools
import warnings

import torch

RTOL = 1e-4


@functools.lru_cache(maxsize=8)
def load_reference(model_dir: str):
    """The transformers model at `model_dir`, fp32, eval, eager attention (the obvious path)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def reference_logits(model_dir, token_ids) -> torch.Tensor:
    """Logits float32 [T, V] at every position of one sequence, recomputed from scratch (no cache)."""
    model = load_reference(str(model_dir))
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(token_ids)], dtype=torch.long)).logits[0].float()


@functools.lru_cache(maxsize=512)
def _greedy(model_dir: str, prompt_ids: tuple[int, ...], max_new_tokens: int):
    tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        logits = reference_logits(model_dir, prompt_ids + tuple(tokens))[-1]
        step_logits.append(logits)
        tokens.append(int(logits.argmax()))
    return tuple(tokens), tuple(step_logits)


def reference_greedy(model_dir, prompt_ids, max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation by transformers: (tokens, step_logits) where step_logits[i] [V] are the
    logits that chose tokens[i]. Every step recomputes the whole sequence, so the reference shares
    no KV-cache code with what it checks. Does not stop at eos."""
    tokens, step_logits = _greedy(str(model_dir), tuple(int(t) for t in prompt_ids), max_new_tokens)
    return list(tokens), list(step_logits)


def tolerance(ref: torch.Tensor, rtol: float = RTOL) -> float:
    """The absolute tolerance for comparing with `ref`: rtol * max|ref|."""
    return rtol * float(ref.abs().max())


def top2_margin(ref_logits: torch.Tensor) -> float:
    """top1 - top2 of a logits vector [V]."""
    top = torch.topk(ref_logits.float(), 2).values
    return float(top[0] - top[1])


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL, context: str = "") -> None:
    """max|ours - ref| <= rtol * max|ref| (same shape; compared in float32 on CPU)."""
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    assert ours.shape == ref.shape, f"{context}: shape {list(ours.shape)} != reference {list(ref.shape)}"
    diff, tol = float((ours - ref).abs().max()), tolerance(ref, rtol)
    assert diff <= tol, f"{context}: max|ours - ref| = {diff:.3g} > {rtol} * max|ref| = {tol:.3g}"


def assert_greedy_matches(our_tokens, our_step_logits, ref_tokens, ref_step_logits,
                          rtol: float = RTOL, context: str = "") -> list[str]:
    """Compare a greedy run with the reference's, step by step: logits within tolerance, tokens
    identical unless the reference margin is a near-tie (<= tolerance). Returns (and warns) the
    near-tie notes; stops comparing at the first near-tie divergence. `our_step_logits` may be None
    (tokens only)."""
    assert len(our_tokens) == len(ref_tokens), f"{context}: {len(our_tokens)} tokens, reference {len(ref_tokens)}"
    notes = []
    for step, (ours, ref, ref_logits) in enumerate(zip(our_tokens, ref_tokens, ref_step_logits)):
        if our_step_logits is not None:
            assert_logits_close(our_step_logits[step], ref_logits, rtol, f"{context} step {step}")
        if ours != ref:
            margin, tol = top2_margin(ref_logits), tolerance(ref_logits, rtol)
            assert margin <= tol, (f"{context} step {step}: token {ours} != reference {ref} "
                                   f"with reference margin {margin:.3g} > tolerance {tol:.3g}")
            notes.append(f"{context} step {step}: near-tie, token {ours} vs reference {ref} "
                         f"(margin {margin:.3g} <= {tol:.3g}); later steps not compared")
            warnings.warn(notes[-1])
            break
    return notes


def mixtral_moe_block(hidden: int, experts: int, tokens: int, intermediate: int = 24):
    """transformers' MixtralSparseMoeBlock (top-2, fused gate_up layout) on seeded weights (x 0.5) and
    seeded tokens: (gate weight [E, H], hidden_states [T, H], its output [T, H], each expert as a
    shardmesh SwiGLUMLP with w1 = gate and w3 = up)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from shardmesh.models.layers import SwiGLUMLP

    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts,
                           num_experts_per_tok=2)
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape) * 0.5)
    hidden_states = torch.randn(tokens, hidden)  # [T, H]
    with torch.no_grad():
        expected = block(hidden_states[None])[0]
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    mlps = [SwiGLUMLP(gate_up[e, :intermediate].contiguous(), gate_up[e, intermediate:].contiguous(),
                      down[e].contiguous()) for e in range(experts)]
    return block.gate.weight.detach().contiguous(), hidden_states, expected, mlps
