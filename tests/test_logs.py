"""Structured logs: JSON lines carrying the request id of the request a line concerns."""

import asyncio
import io
import json
import logging

from shardmesh.client import AsyncClient
from shardmesh.telemetry import logs

from mesh_helpers import local_mesh


def json_handler(stream: io.StringIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("router"))
    handler.addFilter(logs._RequestContext())
    return handler


def test_json_lines_carry_the_request_id_of_their_context():
    stream = io.StringIO()
    logger = logging.getLogger("shardmesh.test_logs")
    logger.addHandler(json_handler(stream))
    logger.setLevel(logging.INFO)
    try:
        logger.info("outside %s", "requests")
        token = logs.request_id.set(42)
        try:
            logger.warning("inside")
        finally:
            logs.request_id.reset(token)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.handlers.clear()
    outside, inside, failed = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert outside["message"] == "outside requests" and "request_id" not in outside
    assert outside["service"] == "router" and outside["logger"] == "shardmesh.test_logs"
    assert outside["ts"].endswith("Z") and outside["level"] == "INFO"
    assert inside["request_id"] == 42 and inside["level"] == "WARNING"
    assert "ValueError: boom" in failed["exception"]


def test_each_request_logs_its_end_with_its_id(mixtral_dir):
    stream = io.StringIO()
    logger = logging.getLogger("shardmesh.requests")
    logger.addHandler(json_handler(stream))
    logger.setLevel(logging.INFO)

    async def main():
        async with local_mesh(mixtral_dir) as mesh, AsyncClient(mesh.address, timeout=60) as client:
            for max_new_tokens in (2, 3):
                tokens = [t.token_id async for t in client.generate([1, 5], max_new_tokens=max_new_tokens,
                                                                    ignore_eos=True)]
                assert len(tokens) == max_new_tokens
            stopped = await client.generate_all([1, 5], max_new_tokens=3, stop_token_ids=[tokens[1]], ignore_eos=True)
            return tokens.index(tokens[1]) + 1, stopped.finish_reason

    try:
        stop_length, finish = asyncio.run(main())
    finally:
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
    ended = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert finish == "stop"
    assert [e["message"].split(" in ")[0] for e in ended] == ["request finished: length, 2 tokens",
                                                              "request finished: length, 3 tokens",
                                                              f"request finished: stop, {stop_length} tokens"]
    assert len({e["request_id"] for e in ended}) == 3
