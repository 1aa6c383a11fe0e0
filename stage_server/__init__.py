"""The stage service: a layer range of the model, its KV cache, and its MoE gates."""
