"""The baseline: transformers `generate` in one process, timed step by step."""

import pathlib
import time

import torch

import harness


def run_transformers(model_dir: pathlib.Path, prompts: list[list[int]], new_tokens: int, threads: int,
                     repeats: int) -> dict:
    """`generate` on the whole batch (greedy, no early stop) with `threads` torch threads; the step
    time is the mean gap between logits-processor calls (the best of `repeats` runs). Also counts
    the distinct experts transformers' gates pick per layer and decode step (for the floor)."""
    import transformers

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = harness.load_transformers(model_dir)
    touched: list[int] = []

    def count_experts(module, inputs, output):
        router_indices = output[2]  # [T, K]
        if router_indices.shape[0] == len(prompts):  # a decode step (prefill has T = batch * prompt length)
            touched.append(int(router_indices.unique().numel()))

    hooks = [m.register_forward_hook(count_experts) for m in model.modules()
             if type(m).__name__ == "MixtralTopKRouter"]
    stamps: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    input_ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), do_sample=False, pad_token_id=0)
    best = float("inf")
    with torch.no_grad():
        model.generate(input_ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        for _ in range(repeats):
            touched.clear()
            stamps.clear()
            cpu_before = harness.cpu_seconds(())
            output = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    logits_processor=transformers.LogitsProcessorList([Stamp()]), **kwargs)
            if harness.mean_interval(stamps)[0] < best:
                best, cpu = harness.mean_interval(stamps)[0], (harness.cpu_seconds(()) - cpu_before) / new_tokens
    for hook in hooks:
        hook.remove()
    torch.set_num_threads(previous)
    tokens = output[:, input_ids.shape[1]:].tolist()
    return dict(tpot_s=best, tokens=tokens, experts_touched=sum(touched) / max(len(touched), 1), cpu_s=cpu)
