"""What `shardmesh up` tells each service about threads and extra arguments (no process is started)."""

import shutil

from shardmesh import launcher


def spawned(model_dir, monkeypatch, role: str, **kwargs) -> list[str]:
    commands = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda command, **_: commands.append(command))
    mesh = launcher.Launcher(model_dir, **kwargs)
    try:
        mesh._spawn(f"{role}-x", role)
    finally:
        shutil.rmtree(mesh.workdir, ignore_errors=True)
    return commands[-1]


def value(command: list[str], flag: str) -> str | None:
    """The last value given for `flag` (argparse keeps the last), None if absent."""
    values = [command[i + 1] for i, part in enumerate(command) if part == flag]
    return values[-1] if values else None


def test_threads_by_role_and_compute_threads_for_compute_services_only(mixtral_dir, monkeypatch):
    threads = {"router": 1, "stage": 3, "expert": 2}
    for role, expected in threads.items():
        command = spawned(mixtral_dir, monkeypatch, role, threads_per_service=threads, compute_threads=4)
        assert value(command, "--threads") == str(expected)
        assert value(command, "--compute-threads") == (None if role == "router" else "4")


def test_default_compute_threads_follow_the_host(mixtral_dir, monkeypatch):
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 1)
    assert value(spawned(mixtral_dir, monkeypatch, "expert"), "--compute-threads") == "1"
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 16)
    assert value(spawned(mixtral_dir, monkeypatch, "expert"), "--compute-threads") == "2"


def test_service_args_come_last_and_override(mixtral_dir, monkeypatch):
    command = spawned(mixtral_dir, monkeypatch, "stage", compute_threads=2,
                      service_args={"stage": ["--compute-threads", "1", "--data-plane", "grpc"], "router": ["--x"]})
    assert value(command, "--compute-threads") == "1" and value(command, "--data-plane") == "grpc"
    assert "--x" not in command
