"""The numerical oracle: Hugging Face transformers running the same checkpoint in one process.

Only the demo, tests and benchmarks use it; services never import transformers."""

import pathlib


def transformers_greedy(model_dir: str | pathlib.Path, prompt_ids: list[int], max_new_tokens: int,
                        ignore_eos: bool = False) -> list[int]:
    """Greedy tokens that transformers generates for `prompt_ids` (fp32, CPU), eos included."""
    import torch
    from transformers import AutoModelForCausalLM

    model = _load(str(model_dir))
    kwargs = {"eos_token_id": None} if ignore_eos else {}
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), **kwargs)
    return output[0, len(prompt_ids):].tolist()


_MODELS = {}


def _load(model_dir: str):
    if model_dir not in _MODELS:
        import torch
        from transformers import AutoModelForCausalLM
        _MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _MODELS[model_dir]
