"""`--advertise`: the address a server registers is not always the one it binds (0.0.0.0 in a
container); placeholders name a scaled replica's own host; bad values fail at start."""

import asyncio
import socket

import pytest

from shardmesh import advertise
from shardmesh.client import AsyncClient
from shardmesh.service_config import ServiceConfig

from mesh_helpers import local_mesh


@pytest.mark.parametrize("text, expected", [
    ("stage-0", ("stage-0", None)),
    ("stage-0:50051", ("stage-0", 50051)),
    ("10.1.2.3:1", ("10.1.2.3", 1)),
    ("[::1]", ("[::1]", None)),
    ("[fd00::5]:65535", ("[fd00::5]", 65535)),
])
def test_split_host_port(text, expected):
    assert advertise.split_host_port(text) == expected


@pytest.mark.parametrize("text, complaint", [
    ("0.0.0.0:50051", "no host"), (":50051", "no host"), ("[::]:5", "no host"),
    ("host:0", "not in [1, 65535]"), ("host:65536", "not in [1, 65535]"), ("host:http", "not in [1, 65535]"),
    ("fd00::5", "in brackets"), ("[fd00::5", "is not [IPv6]"), ("[::1]x", "is not [IPv6]"),
])
def test_bad_advertise_is_refused_naming_it(text, complaint):
    with pytest.raises(ValueError, match="advertise") as error:
        advertise.check(text)
    assert complaint in str(error.value)


def test_default_is_the_bound_address_and_a_port_defaults_to_the_bound_one():
    assert advertise.advertised_address("", "127.0.0.1", 4000) == "127.0.0.1:4000"
    assert advertise.advertised_address("stage-0", "0.0.0.0", 4000) == "stage-0:4000"
    assert advertise.advertised_address("stage-0:50051", "0.0.0.0", 4000) == "stage-0:50051"


def test_placeholders_expand_to_this_hosts_name_and_address(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "c0ffee123456")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: {"c0ffee123456": "172.18.0.7"}[name])
    assert advertise.check("{ip}:50051") == "172.18.0.7:50051"
    assert advertise.expand("{hostname}") == "c0ffee123456"
    assert advertise.expand("plain") == "plain"

    def unresolvable(name):
        raise socket.gaierror("Name or service not known")
    monkeypatch.setattr(socket, "gethostbyname", unresolvable)
    with pytest.raises(ValueError, match="does not resolve"):
        advertise.check("{ip}")


def test_service_config_validates_advertise(mixtral_dir):
    config = ServiceConfig(model_dir=mixtral_dir, name="stage-0", host="0.0.0.0", advertise_address="stage-0")
    assert config.advertised(4321) == "stage-0:4321"
    with pytest.raises(ValueError, match="advertise"):
        ServiceConfig(model_dir=mixtral_dir, name="stage-0", advertise_address="0.0.0.0:1")


def test_servers_register_their_advertised_address(mixtral_dir):
    """A second stage-1 binds loopback but advertises "localhost": the router records
    "localhost:PORT" and, with the first stage-1 stopped, streams to it: same tokens."""
    from stage_server.main import start_stage_server

    async def main():
        async with local_mesh(mixtral_dir) as mesh:
            async with AsyncClient(mesh.address, timeout=30) as client:
                before = await client.generate_all([1, 2, 3], max_new_tokens=4, ignore_eos=True)
                stage = await start_stage_server(ServiceConfig(model_dir=mixtral_dir, name="stage-1",
                                                               router_address=mesh.address,
                                                               advertise_address="localhost"))
                try:
                    status = await client.cluster_status()
                    registered = next(s.address for s in status.servers if s.name == "stage-1")
                    assert registered == f"localhost:{stage.port}"
                    await mesh.stages[1].stop(grace=None)  # only the advertised address can answer now
                    after = await client.generate_all([1, 2, 3], max_new_tokens=4, ignore_eos=True)
                finally:
                    await stage.stop(grace=None)
        return before, after

    before, after = asyncio.run(asyncio.wait_for(main(), 60))
    assert after.token_ids == before.token_ids
