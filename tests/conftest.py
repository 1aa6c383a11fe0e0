"""Shared fixtures: small seeded checkpoints built once per test session with `make_checkpoint`.

    mixtral_dir      Mixtral, 4 layers, GQA (4 heads / 2 kv heads), 8 experts top-2
    mixtral_odd_dir  Mixtral, 5 layers, MHA (4 / 4), 6 experts top-3
    llama_dir        Llama, 4 layers, GQA (4 / 2)
    llama_mha_dir    Llama, 3 layers, MHA (4 / 4), head_dim 16 != hidden/heads, tied embeddings
    make_model_dir   factory: make_model_dir(family, **config_overrides) -> a cached checkpoint dir

All have max_position_embeddings 512, bos 1, eos 2 and a tokenizer.json.
"""

import pathlib

import pytest

VARIANTS = {
    "mixtral": dict(family="mixtral", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
    "mixtral_odd": dict(family="mixtral", vocab_size=192, hidden_size=48, intermediate_size=64, num_hidden_layers=5,
                        num_attention_heads=4, num_key_value_heads=4, num_local_experts=6, num_experts_per_tok=3),
    "llama": dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "llama_mha": dict(family="llama", vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory):
    """make_model_dir(family="mixtral", seed=0, **config_overrides) -> pathlib.Path, built once per arguments."""
    built: dict[tuple, pathlib.Path] = {}

    def make(family: str = "mixtral", seed: int = 0, **overrides) -> pathlib.Path:
        from shardmesh.checkpoint_maker import make_checkpoint

        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in built:
            out_dir = tmp_path_factory.mktemp(f"{family}-ckpt")
            built[key] = make_checkpoint(out_dir, family, seed=seed, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def model_dirs(make_model_dir):
    """variant name (see VARIANTS) -> checkpoint dir, built lazily."""

    class Dirs(dict):
        def __missing__(self, name):
            self[name] = make_model_dir(**VARIANTS[name])
            return self[name]

    return Dirs()


@pytest.fixture(scope="session")
def mixtral_dir(model_dirs):
    return model_dirs["mixtral"]


@pytest.fixture(scope="session")
def mixtral_odd_dir(model_dirs):
    return model_dirs["mixtral_odd"]


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def llama_mha_dir(model_dirs):
    return model_dirs["llama_mha"]


@pytest.fixture
def two_compute_threads():
    """This process's compute pool at 2 threads (torch's own at 1, as a service runs), restored after."""
    import torch
    from shardmesh import compute_pool
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    compute_pool.set_threads(2)
    yield
    compute_pool.set_threads(1)
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, on a machine without it (CI)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False here")
    for item in gpu_items:
        item.add_marker(skip)
