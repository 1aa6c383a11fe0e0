"""The model's shape, read once from a checkpoint's config.json and validated."""

import dataclasses
import hashlib
import json
import pathlib

# model_type in config.json -> our family name.
FAMILIES = {"llama": "llama", "mixtral": "mixtral"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str                  # "llama" | "mixtral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int       # dense MLP width, or each expert's width for MoE
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int  # capped at sliding_window, where the checkpoint has one
    tie_word_embeddings: bool
    num_experts: int = 0         # 0 = dense
    experts_per_token: int = 0   # top-k of the MoE gate
    eos_token_ids: tuple[int, ...] = ()
    fingerprint: str = ""        # sha256 of config.json, servers of one mesh must agree

    def __post_init__(self):
        assert self.family in FAMILIES.values(), self.family
        assert self.num_attention_heads % self.num_key_value_heads == 0, "GQA needs heads % kv_heads == 0"
        assert (self.num_experts == 0) == (self.experts_per_token == 0)
        assert self.experts_per_token <= self.num_experts

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_dir(cls, model_dir: str | pathlib.Path) -> "ModelConfig":
        path = pathlib.Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model directory holds config.json and *.safetensors")
        raw_bytes = path.read_bytes()
        raw = json.loads(raw_bytes)
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{path}: model_type {model_type!r} is not served (served: {sorted(FAMILIES)})")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not served (silu only)")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{path}: rope scaling {rope!r} is not served yet")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        max_positions = raw.get("max_position_embeddings", 2048)
        window = raw.get("sliding_window")
        if window is not None and window < max_positions:
            # Within the window, sliding-window attention equals full attention: serve that far.
            max_positions = window
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ValueError(f"{path}: attention_bias / mlp_bias are not served yet")
        return cls(
            family=FAMILIES[model_type],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            num_experts=raw.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            experts_per_token=raw.get("num_experts_per_tok", 0) if model_type == "mixtral" else 0,
            eos_token_ids=eos_ids,
            fingerprint=hashlib.sha256(raw_bytes).hexdigest()[:16],
        )
