"""The expert service: hosts a set of MoE experts (layer, expert) and computes them for stages."""
