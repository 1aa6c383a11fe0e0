"""Telemetry switches of every service: a --metrics-port that cannot be served stops the service
at start with exit code 2 and a message naming the flag."""

import logging
import socket

import pytest

from shardmesh import cli


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("port, message", [(70000, "--metrics-port 70000 is not in [0, 65535]"),
                                           (None, "cannot listen on 127.0.0.1")])
def test_a_metrics_port_that_cannot_be_served_exits_2_naming_it(mixtral_dir, busy_port, caplog, port, message):
    port = busy_port if port is None else port
    with caplog.at_level(logging.ERROR, logger="shardmesh"):
        code = cli.main(["expert", "--model", str(mixtral_dir), "--name", "experts-a", "--router", "127.0.0.1:1",
                         "--metrics-port", str(port), "--log-level", "ERROR", "--no-auth"])
    assert code == 2
    assert message in caplog.text and f"--metrics-port {port}" in caplog.text
