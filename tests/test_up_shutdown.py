"""`shardmesh up` as users stop it: Ctrl-C in a terminal (SIGINT to the whole foreground process
group) stops the router first, which drains, so a generation in flight completes with the right
tokens through stages and experts that are still running; then everything exits, status 0, no
process left. The same mesh runs `--tls-clients-without-certificates`: services speak mutual TLS,
a client connects with the CA and its token but no certificate. The flag's misuses are refused."""

import os
import pathlib
import signal
import subprocess
import threading

import pytest

from shardmesh.client import Client
from shardmesh.launcher import Launcher
from shardmesh.mesh_secrets import TlsFiles
from shardmesh.reference import transformers_greedy
from shardmesh.security import client_credentials
from test_cli_processes import SHARDMESH, processes_mentioning, shardmesh_up, wait_for_line, wait_gone

pytestmark = pytest.mark.slow
PROMPT, NEW_TOKENS = [1, 9, 27, 81], 100  # still decoding when Ctrl-C comes after its 2nd token


def test_ctrl_c_drains_the_router_first_and_clients_need_no_certificate(mixtral_dir, tmp_path):
    certs = tmp_path / "certs"
    made = subprocess.run([*SHARDMESH, "certs", str(certs)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    tls = ("--tls-cert", str(certs / "service.pem"), "--tls-key", str(certs / "service-key.pem"),
           "--tls-ca", str(certs / "ca.pem"), "--tls-clients-without-certificates")
    with shardmesh_up(mixtral_dir, tmp_path, *tls, start_new_session=True) as (up, lines, model):
        address = wait_for_line(lines, "router listening on", timeout=180).split()[3]
        hint = wait_for_line(lines, "client token in ", timeout=5)
        assert "--tls-ca" in hint and "--tls-cert" not in hint, hint  # no client certificate needed
        token = pathlib.Path(hint.split()[3].rstrip(":")).read_text().strip()
        credentials = client_credentials(ca_file=certs / "ca.pem")  # the CA only: no certificate
        tokens, second_token, failure = [], threading.Event(), []

        def generate():
            try:
                with Client(address, timeout=120, token=token, credentials=credentials) as client:
                    for event in client.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True):
                        tokens.append(event.token_id)
                        if len(tokens) == 2:
                            second_token.set()
            except Exception as error:  # reported below
                failure.append(error)
                second_token.set()

        generation = threading.Thread(target=generate)
        generation.start()
        assert second_token.wait(120) and not failure, failure
        services = set(processes_mentioning(str(model))) - {up.pid}
        assert len(services) == 5  # router, 2 stages, 2 expert servers
        # Ctrl-C reaches the terminal's foreground process group: the launcher's, none of theirs.
        assert all(os.getpgid(pid) != os.getpgid(up.pid) for pid in services)
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C
        generation.join(120)
        assert not failure, failure
        assert len(tokens) == NEW_TOKENS  # finished during the drain, all of it
        assert up.wait(timeout=90) == 0
        assert wait_gone(model) == []
    assert tokens == transformers_greedy(mixtral_dir, PROMPT, NEW_TOKENS, ignore_eos=True)


def test_without_certificates_reaches_the_router_only(tmp_path):
    tls = TlsFiles(tmp_path / "s.pem", tmp_path / "k.pem", tmp_path / "ca.pem", clients_without_certificates=True)
    assert "--tls-clients-without-certificates" in tls.args("router")
    assert "--tls-clients-without-certificates" not in tls.args("stage") + tls.args("expert")


@pytest.mark.parametrize("args, message", [
    (["--tls-clients-without-certificates"], "needs --tls-cert, --tls-key and --tls-ca"),
    (["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a", "--tls-clients-without-certificates", "--no-auth"],
     "contradicts --no-auth"),
])
def test_up_refuses_the_flag_misused(mixtral_dir, args, message):
    up = subprocess.run([*SHARDMESH, "up", "--model", str(mixtral_dir), *args], capture_output=True, text=True,
                        timeout=60)
    assert up.returncode != 0 and message in up.stderr, up.stderr


def test_launcher_stops_the_router_before_the_servers(monkeypatch):
    order = []

    class Process:
        def __init__(self, name):
            self.name = name

        def poll(self):
            return None

        def send_signal(self, signum):
            order.append(("SIGTERM", self.name))

        def wait(self, timeout=None):
            order.append(("exited", self.name))

    launcher = Launcher.__new__(Launcher)  # only its processes matter to stop()
    launcher.processes = {name: Process(name) for name in ("stage-0", "experts-a", "router")}
    launcher.stop()
    assert order[:2] == [("SIGTERM", "router"), ("exited", "router")], order
    assert {name for _, name in order[2:]} == {"stage-0", "experts-a"}
