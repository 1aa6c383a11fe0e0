"""Device and dtype selection on a machine with or without CUDA: `--device cpu|cuda:N` and
`--dtype` reach every service (serve, `shardmesh up`, the in-process mesh), are validated once in
ServiceConfig, and default to bfloat16 on CUDA, float32 on CPU. The CUDA paths themselves run in
test_gpu.py (marked gpu)."""

import logging
import shutil

import pytest
import torch

from shardmesh import cli, cli_up, launcher
from shardmesh.checkpoint import CheckpointReader
from shardmesh.service_config import ServiceConfig


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend this machine has `count` CUDA devices (0 = none): only the checks are exercised."""
    def set_count(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return set_count


def test_cpu_defaults_to_float32(llama_dir):
    config = ServiceConfig(model_dir=llama_dir)
    assert (config.device, config.dtype, config.torch_dtype) == ("cpu", "float32", torch.float32)
    assert ServiceConfig(model_dir=llama_dir, dtype="bfloat16").torch_dtype == torch.bfloat16


def test_cuda_defaults_to_bfloat16_and_is_normalized(llama_dir, fake_cuda):
    fake_cuda(2)
    assert (ServiceConfig(model_dir=llama_dir, device="cuda").device, ServiceConfig(model_dir=llama_dir,
            device="cuda").dtype) == ("cuda:0", "bfloat16")
    config = ServiceConfig(model_dir=llama_dir, device="cuda:1", dtype="float32")
    assert (config.device, config.torch_dtype) == ("cuda:1", torch.float32)


@pytest.mark.parametrize("device,count,message", [
    ("gpu", 1, "'gpu' is not 'cpu' or 'cuda:N'"),
    ("cuda:x", 1, "'cuda:x' is not 'cpu' or 'cuda:N'"),
    ("mps", 1, "'mps' is not 'cpu' or 'cuda:N'"),
    ("cuda:0", 0, "CUDA is not available"),
    ("cuda:2", 2, "this machine has 2 CUDA device(s)"),
])
def test_unusable_devices_are_refused_by_name(llama_dir, fake_cuda, device, count, message):
    fake_cuda(count)
    with pytest.raises(ValueError) as error:
        ServiceConfig(model_dir=llama_dir, device=device)
    assert message in str(error.value)


def test_a_service_asked_for_a_missing_gpu_exits_2_naming_it(mixtral_dir, fake_cuda, caplog):
    fake_cuda(0)
    with caplog.at_level(logging.ERROR, logger="shardmesh"):
        code = cli.main(["stage", "--model", str(mixtral_dir), "--name", "stage-0", "--router", "127.0.0.1:1",
                         "--device", "cuda:0", "--log-level", "ERROR", "--no-auth"])
    assert code == 2
    assert "device 'cuda:0' asked for, but CUDA is not available" in caplog.text


def test_shardmesh_up_passes_device_and_dtype_to_every_service(mixtral_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli_up, "run_up", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs) or 0)
    assert cli.main(["up", "--model", str(mixtral_dir), "--device", "cuda:1"]) == 0
    assert seen["kwargs"]["device"] == "cuda:1" and seen["args"][3] == ""  # dtype: the device's default

    commands = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda command, **kwargs: commands.append(command))
    for dtype, expected in (("", None), ("float16", "float16")):
        mesh = launcher.Launcher(mixtral_dir, device="cuda:1", dtype=dtype)
        try:
            mesh._spawn("stage-0", "stage", "--name", "stage-0")
        finally:
            shutil.rmtree(mesh.workdir, ignore_errors=True)
        command = commands[-1]
        assert command[command.index("--device") + 1] == "cuda:1"
        assert (command[command.index("--dtype") + 1] if "--dtype" in command else None) == expected


def test_local_mesh_refuses_devices_for_unknown_servers(mixtral_dir):
    import asyncio

    from shardmesh.local_mesh import start_local_mesh

    with pytest.raises(KeyError, match="stage-9"):
        asyncio.run(start_local_mesh(mixtral_dir, devices={"stage-9": "cpu"}))


def test_checkpoint_reader_reads_onto_its_device(mixtral_dir):
    reader = CheckpointReader(mixtral_dir, device="cpu")
    tensor = reader.get("model.layers.0.self_attn.q_proj.weight", torch.bfloat16)
    assert (tensor.device, tensor.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert reader.bytes_read == tensor.numel() * 4  # counted as stored (fp32), before the cast
