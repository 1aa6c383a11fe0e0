"""What users run, as real processes: `shardmesh up` (every service its own process on loopback),
`shardmesh generate`, Ctrl-C/SIGTERM stopping everything, and the demo (the main job)."""

import contextlib
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from shardmesh.client import Client, UnauthenticatedError
from shardmesh.reference import transformers_greedy

pytestmark = pytest.mark.slow
SHARDMESH = [sys.executable, "-m", "shardmesh.cli"]


def processes_mentioning(text: str) -> list[int]:
    """Ids of live processes whose command line mentions `text` (ours: a unique temp path)."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split()[2]
            except OSError:
                continue
            if text in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


def read_lines(process: subprocess.Popen) -> "queue.Queue[str]":
    lines: queue.Queue[str] = queue.Queue()

    def pump():
        for line in process.stdout:
            lines.put(line)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(lines: "queue.Queue[str]", prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting {prefix!r} within {timeout} s; got {''.join(seen)!r}")


@contextlib.contextmanager
def shardmesh_up(model_dir: pathlib.Path, tmp_path: pathlib.Path, *args: str, start_new_session: bool = False):
    """Run `shardmesh up` on a link to `model_dir` unique to this test (so its processes can be
    found by their command lines); yield (process, output lines, link). Whatever is left is
    killed, by pid, on the way out. start_new_session: its own process group, as a shell gives a
    foreground job (os.killpg is then a terminal's Ctrl-C)."""
    model = tmp_path / "model"
    model.symlink_to(model_dir)
    up = subprocess.Popen([*SHARDMESH, "up", "--model", str(model), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=start_new_session)
    try:
        yield up, read_lines(up), model
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in processes_mentioning(str(model)):
            os.kill(pid, signal.SIGKILL)


def wait_gone(model: pathlib.Path, timeout: float = 15.0) -> list[int]:
    """Wait (bounded) until no process mentions `model`; return those still there."""
    deadline = time.monotonic() + timeout
    while processes_mentioning(str(model)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes_mentioning(str(model))


def test_up_generate_and_sigterm_stops_everything(mixtral_dir, tmp_path):
    with shardmesh_up(mixtral_dir, tmp_path) as (up, lines, model):
        line = wait_for_line(lines, "router listening on", timeout=120)
        address = line.split()[3]
        token_file = wait_for_line(lines, "client token in ", timeout=5).split()[3].rstrip(":")
        assert len(set(processes_mentioning(str(model))) - {up.pid}) == 5  # router, 2 stages, 2 expert servers

        # A fresh random token protects the mesh by default; without it nothing is served.
        with Client(address, timeout=60) as client:
            with pytest.raises(UnauthenticatedError):
                client.generate_all([1, 9, 27, 81], max_new_tokens=6, ignore_eos=True)
        with Client(address, timeout=60, token=pathlib.Path(token_file).read_text().strip()) as client:
            tokens = client.generate_all([1, 9, 27, 81], max_new_tokens=6, ignore_eos=True).token_ids
        assert tokens == transformers_greedy(mixtral_dir, [1, 9, 27, 81], 6, ignore_eos=True)

        cli = subprocess.run([*SHARDMESH, "generate", "--router", address, "--token-file", token_file,
                              "--prompt-ids", "1,9,27,81",
                              "--max-new-tokens", "6", "--ignore-eos", "--output", "ids"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert all(str(t) in cli.stdout for t in tokens), cli.stdout

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
        assert wait_gone(model) == []


def test_killed_launcher_leaves_no_orphans(mixtral_dir, tmp_path):
    with shardmesh_up(mixtral_dir, tmp_path, "--no-auth") as (up, lines, model):
        wait_for_line(lines, "router listening on", timeout=120)
        assert len(set(processes_mentioning(str(model))) - {up.pid}) == 5
        up.kill()  # SIGKILL: the launcher cannot clean up; its children must go by themselves
        up.wait()
        assert wait_gone(model) == []


def test_demo_runs_the_main_job(tmp_path):
    demo = subprocess.run([*SHARDMESH, "demo", "--max-new-tokens", "8"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "making a seeded demo checkpoint" in out and (tmp_path / "demo-model" / "tokenizer.json").exists()
    assert "mesh SERVING" in out and "mesh stopped" in out
    assert "check: 3/3 generations identical to transformers" in out and "OK" in out
    assert processes_mentioning(str(tmp_path)) == []
