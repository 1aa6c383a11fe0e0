"""Build small seeded Hugging Face checkpoints (safetensors + tokenizer.json) for tests and the demo.

Needs `transformers` (the `oracle` extra), imported inside the functions only: the services import
this package without ever loading it.

Random weights are scaled up (x `weight_scale`) so that next-token distributions are sharp and a
greedy comparison proves something (at the default init the top two logits are often within
1e-3); norm weights are drawn near 1 (1 + 0.1 * normal) so that they matter but stay sane.
"""

import json
import pathlib
from collections.abc import Callable

import torch

# The demo's model: Mixtral-shaped, small enough to build and generate with transformers in seconds.
DEMO_CONFIG = dict(
    family="mixtral", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=512,
)

_DEFAULTS = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    tie_word_embeddings=False,
)
_MOE_DEFAULTS = dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 = unk, bos_token_id, eos_token_id

TOKENIZER_TEXT = """\
The mesh serves one language model split across many small services. Each stage holds a range of
layers and the keys and values of every sequence it has seen. Experts live on their own servers,
and the gate of every layer sends each token to the two experts it likes best. When a request
arrives, the router forms a batch, streams it through the stages, and samples the next token.
A good test compares every logit with a trusted reference and demands the same greedy tokens.
Small models are fast to build: a few layers, a few heads, a vocabulary of a few hundred pieces.
The quick brown fox jumps over the lazy dog while the river runs down to the sea in the morning.
Numbers such as 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear too, with punctuation: commas, periods; and
questions? Yes! Names like Alice, Bob and Carol send messages to each other over the network.
"""


def make_checkpoint(out_dir: str | pathlib.Path, family: str = "mixtral", *, seed: int = 0,
                    weight_scale: float = 3.0, with_tokenizer: bool = True,
                    progress: Callable[[str], None] | None = None, **config_overrides) -> pathlib.Path:
    """Build a seeded `family` model ("llama" | "mixtral") and save it to `out_dir` as Hugging Face does.

    config_overrides are transformers config fields (num_hidden_layers=3, num_key_value_heads=4,
    tie_word_embeddings=True, ...) over small defaults. Weights go to safetensors with the names on
    disk of the original checkpoints (Mixtral: model.layers.N.block_sparse_moe.experts.E.w1.weight).
    With `with_tokenizer`, also writes a BPE tokenizer.json trained on a built-in English snippet
    (vocab <= the model's; <unk>, <s>, </s> = 0, 1, 2 = config's bos/eos). Returns the directory."""
    import transformers

    from shardmesh.models import get_family

    report = progress or (lambda message: None)
    out_dir = pathlib.Path(out_dir)
    model_class = getattr(transformers, get_family(family).HF_CLASS)
    kwargs = {**_DEFAULTS, **(_MOE_DEFAULTS if family == "mixtral" else {}), **config_overrides}
    config = model_class.config_class(**kwargs)
    report("building model")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.mul_(weight_scale)
    report("saving weights")
    model.save_pretrained(out_dir)
    _check_layout(out_dir, family)
    if with_tokenizer:
        report("training tokenizer")
        write_tokenizer(out_dir, config.vocab_size)
    report("done")
    return out_dir


def _check_layout(out_dir: pathlib.Path, family: str) -> None:
    """Fail loudly if transformers ever stops saving per-expert keys (it fuses them in memory)."""
    from shardmesh.checkpoint import CheckpointReader

    keys = CheckpointReader(out_dir).keys()
    if family == "mixtral" and "model.layers.0.block_sparse_moe.experts.0.w1.weight" not in keys:
        raise RuntimeError(f"transformers saved no per-expert keys in {out_dir}: {sorted(keys)[:8]}")
    if "model.layers.0.self_attn.q_proj.weight" not in keys:
        raise RuntimeError(f"unexpected weight names in {out_dir}: {sorted(keys)[:8]}")


def write_tokenizer(out_dir: str | pathlib.Path, vocab_size: int) -> pathlib.Path:
    """Train a BPE tokenizer with at most `vocab_size` pieces on TOKENIZER_TEXT; write tokenizer.json
    (+ tokenizer_config.json naming the special tokens). Character-level BPE with <unk> and
    Metaspace word boundaries rather than byte-level: every piece is whole characters, so the
    arbitrary token sequences a random model emits still decode to readable text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  limit_alphabet=max(1, min(100, vocab_size - len(SPECIAL_TOKENS) - 8)))
    tokenizer.train_from_iterator(TOKENIZER_TEXT.splitlines(), trainer)
    assert tokenizer.get_vocab_size() <= vocab_size, (tokenizer.get_vocab_size(), vocab_size)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    out_dir = pathlib.Path(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "model_max_length": 1 << 30}, indent=2) + "\n")
    return out_dir / "tokenizer.json"
