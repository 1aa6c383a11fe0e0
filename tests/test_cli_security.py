"""Security as users meet it, with real processes: `shardmesh certs` + `shardmesh up --tls-*`
(mutual TLS among every service, fresh tokens) + `shardmesh generate --token-file --tls-*`; and
a router that refuses to start without a token unless told `--no-auth`."""

import os
import signal
import subprocess
import sys

import pytest

from shardmesh.reference import transformers_greedy

from test_cli_processes import shardmesh_up, wait_for_line

pytestmark = pytest.mark.slow
SHARDMESH = [sys.executable, "-m", "shardmesh.cli"]


def test_up_with_mutual_tls_and_tokens(mixtral_dir, tmp_path):
    certs = tmp_path / "certs"
    made = subprocess.run([*SHARDMESH, "certs", str(certs)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    tls = ["--tls-cert", str(certs / "service.pem"), "--tls-key", str(certs / "service-key.pem"),
           "--tls-ca", str(certs / "ca.pem")]
    with shardmesh_up(mixtral_dir, tmp_path, *tls) as (up, lines, model):
        address = wait_for_line(lines, "router listening on", timeout=120).split()[3]
        token_file = wait_for_line(lines, "client token in ", timeout=5).split()[3].rstrip(":")
        client_tls = ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
                      "--tls-key", str(certs / "client-key.pem")]
        generate = [*SHARDMESH, "generate", "--router", address, "--prompt-ids", "1,9,27,81", "--max-new-tokens", "6",
                    "--ignore-eos", "--output", "ids", "--timeout", "60"]
        good = subprocess.run([*generate, "--token-file", token_file, *client_tls],
                              capture_output=True, text=True, timeout=90)
        assert good.returncode == 0, good.stderr
        expected = transformers_greedy(mixtral_dir, [1, 9, 27, 81], 6, ignore_eos=True)
        assert [int(t) for t in good.stdout.split()] == expected

        no_token = subprocess.run([*generate, *client_tls], capture_output=True, text=True, timeout=60,
                                  env={k: v for k, v in os.environ.items() if k != "SHARDMESH_AUTH_TOKEN"})
        assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr, no_token.stderr
        no_client_cert = subprocess.run([*generate, "--token-file", token_file, "--tls-ca", str(certs / "ca.pem"),
                                         "--timeout", "5"], capture_output=True, text=True, timeout=60)
        assert no_client_cert.returncode == 1 and "UNAVAILABLE" in no_client_cert.stderr, no_client_cert.stderr
        plaintext = subprocess.run([*generate, "--token-file", token_file, "--timeout", "5"],
                                   capture_output=True, text=True, timeout=60)
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0


def test_router_without_a_token_refuses_to_start(mixtral_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDMESH_")}
    result = subprocess.run([*SHARDMESH, "router", "--model", str(mixtral_dir)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "--auth-token-file" in result.stderr and "--no-auth" in result.stderr, result.stderr


def test_up_with_named_client_tokens(mixtral_dir, tmp_path):
    tokens = tmp_path / "client-tokens"
    tokens.write_text("# name token\nalice alice-secret-0123456789\nbob bob-secret-9876543210\n")
    (tmp_path / "alice").write_text("alice-secret-0123456789\n")
    (tmp_path / "mallory").write_text("mallory-guess-0000000000\n")
    with shardmesh_up(mixtral_dir, tmp_path, "--auth-tokens-file", str(tokens)) as (up, lines, model):
        address = wait_for_line(lines, "router listening on", timeout=120).split()[3]
        assert "alice, bob" in wait_for_line(lines, "named client tokens from", timeout=5)
        generate = [*SHARDMESH, "generate", "--router", address, "--prompt-ids", "1,9,27,81", "--max-new-tokens", "3",
                    "--ignore-eos", "--output", "ids", "--timeout", "60"]
        env = {k: v for k, v in os.environ.items() if k != "SHARDMESH_AUTH_TOKEN"}
        good = subprocess.run([*generate, "--token-file", str(tmp_path / "alice")], capture_output=True, text=True,
                              timeout=90, env=env)
        assert good.returncode == 0, good.stderr
        assert [int(t) for t in good.stdout.split()] == transformers_greedy(mixtral_dir, [1, 9, 27, 81], 3,
                                                                           ignore_eos=True)
        bad = subprocess.run([*generate, "--token-file", str(tmp_path / "mallory")], capture_output=True, text=True,
                             timeout=60, env=env)
        assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr, bad.stderr
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0


@pytest.mark.parametrize("contents, extra, message", [
    ("alice one two\n", [], "expected `NAME TOKEN`, got 3 fields"),
    ("alice secret-1234567890\n", ["--no-auth"], "leave out --no-auth"),
])
def test_up_refuses_a_bad_tokens_file_before_starting_anything(mixtral_dir, tmp_path, contents, extra, message):
    tokens = tmp_path / "client-tokens"
    tokens.write_text(contents)
    result = subprocess.run([*SHARDMESH, "up", "--model", str(mixtral_dir), "--auth-tokens-file", str(tokens), *extra],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "starting" not in result.stdout
