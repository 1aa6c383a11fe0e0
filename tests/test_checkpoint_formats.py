"""Checkpoints in pickle formats are refused before anything in them is read: each file below holds
a pickle whose loading would create a marker file, and the marker never appears."""

import asyncio
import json
import pathlib
import pickle
import shutil
import subprocess
import sys

import pytest

from shardmesh.checkpoint import CheckpointReader
from shardmesh.service_config import ServiceConfig

from stage_server.main import start_stage_server


class CreatesMarker:
    """Unpickling this opens (creates) `path` for writing: the effect a hostile checkpoint would have."""

    def __init__(self, path: pathlib.Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def hostile_dir(mixtral_dir, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A model dir with the real config and tokenizer but only pickle weights; and the marker path."""
    model_dir, marker = tmp_path / "model", tmp_path / "unpickled"
    model_dir.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(mixtral_dir / name, model_dir / name)
    payload = pickle.dumps(CreatesMarker(marker))
    for name in ("pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"):
        (model_dir / name).write_bytes(payload)
    return model_dir, marker


def test_reader_refuses_pickle_formats(hostile_dir):
    model_dir, marker = hostile_dir
    with pytest.raises(FileNotFoundError, match="pickle formats are refused") as info:
        CheckpointReader(model_dir)
    assert all(name in str(info.value) for name in ("pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"))
    assert not marker.exists()


def test_stage_server_refuses_before_serving(hostile_dir):
    model_dir, marker = hostile_dir
    config = ServiceConfig(model_dir=model_dir, name="stage-0")
    with pytest.raises(FileNotFoundError, match="pickle formats are refused"):
        asyncio.run(start_stage_server(config))
    assert not marker.exists()


def test_index_naming_a_pickle_file_is_refused(hostile_dir):
    model_dir, marker = hostile_dir
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "pytorch_model.bin"}}))
    with pytest.raises(ValueError, match="pickle formats are refused"):
        CheckpointReader(model_dir)
    assert not marker.exists()


def test_pickle_bytes_named_safetensors_are_not_unpickled(hostile_dir):
    model_dir, marker = hostile_dir
    (model_dir / "model.safetensors").write_bytes((model_dir / "pytorch_model.bin").read_bytes())
    with pytest.raises(Exception) as info:  # safetensors' own header error: it parses JSON, never pickle
        CheckpointReader(model_dir)
    assert "safetensor" in type(info.value).__name__.lower() or "header" in str(info.value).lower(), info.value
    assert not marker.exists()


def test_command_line_service_exits_with_the_reason(hostile_dir):
    model_dir, marker = hostile_dir
    result = subprocess.run([sys.executable, "-m", "shardmesh.cli", "expert", "--model", str(model_dir),
                             "--name", "experts-a", "--router", "127.0.0.1:1", "--no-auth"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pickle formats are refused" in result.stderr, result.stderr
    assert not marker.exists()
