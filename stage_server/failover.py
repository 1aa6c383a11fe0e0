"""Failover of a layer's expert calls (RemoteExperts, SplitExperts): the parts of a server that failed a
call (ServerFailed: dead, frozen, stopping, or a broken shared-memory plane) are sent again to other
replicas within the same step, for at most MAX_ATTEMPTS rounds; the failed server is avoided for
DOWN_RETRY_S. And the check of a per-group answer (checked_outputs)."""

import asyncio
import logging
import time

import torch

from shardmesh.errors import RequestError, Unavailable
from shardmesh.telemetry import tracing
from shardmesh.v1 import expert_pb2

log = logging.getLogger("stage_server.remote_experts")  # (the name its warnings always had)
MAX_ATTEMPTS = 3      # rounds of calls for one layer's pieces: the first and two re-sends
DOWN_RETRY_S = 10.0   # a server that failed a call is avoided this long (unless it is an expert's last replica)


class ServerFailed(Exception):
    """A call failed in a way another replica may not (the server is dead, frozen or stopping)."""


async def with_failover(owner, layer: int, todo: list, assign, call, describe, what: str, first=None) -> dict:
    """Every part of `todo` computed by some server: `assign(todo, avoid)` -> {address: parts} (avoid:
    part -> addresses that failed it in this call), `call(address, parts)` -> their outputs in order,
    all servers at once. The parts of a server that raised ServerFailed go round again, at most
    MAX_ATTEMPTS rounds, and the server is avoided for DOWN_RETRY_S. `owner`: its `_down`
    (address -> monotonic time until which it is avoided), `failovers` (counted) and `server_name`;
    `describe(parts)` and `what` word the log and the error. `first`: (address, parts, ServerFailed)
    of a first round the caller made itself (all of `todo` to one server, which failed), or None.
    Returns part -> output; Unavailable when a part found no replica."""
    outputs: dict = {}
    avoid: dict = {}
    failures: list[str] = []
    for attempt in range(MAX_ATTEMPTS):
        if attempt == 0 and first is not None:  # the caller's own first round
            by_server, answers = {first[0]: first[1]}, [first[2]]
        else:
            by_server = assign(todo, avoid)
            answers = await _round(layer, by_server, call)
        todo = []
        for (address, parts), answer in zip(by_server.items(), answers):
            if isinstance(answer, ServerFailed):
                owner._down[address] = time.monotonic() + DOWN_RETRY_S
                failures.append(str(answer))
                for part in parts:
                    avoid.setdefault(part, set()).add(address)
                todo += parts
                log.warning("%s: %s; %s go to other replicas (attempt %d of %d)", owner.server_name, answer,
                            describe(parts), attempt + 1, MAX_ATTEMPTS)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                outputs.update(zip(parts, answer))
        if not todo:
            return outputs
        owner.failovers += len(todo)
    raise Unavailable("experts", f"layer {layer}: no replica {what}answered after {MAX_ATTEMPTS} attempts: "
                                 + "; ".join(failures[-2:]))


async def _round(layer: int, by_server: dict, call) -> list:
    """Each server's answer to its parts (outputs, or the exception it raised), all servers at once."""
    with tracing.span("moe.dispatch", layer=layer):  # a no-op context unless tracing is on
        if len(by_server) == 1:  # one server (batch 1, mostly): its call in this task, not one of its own
            [(address, parts)] = by_server.items()
            try:
                return [await call(address, parts)]
            except ServerFailed as error:
                return [error]
        return await asyncio.gather(*(call(address, parts) for address, parts in by_server.items()),
                                    return_exceptions=True)


def checked_outputs(address: str, inputs: list[torch.Tensor], reply: expert_pb2.ComputeExpertsResponse,
                    decode) -> list[torch.Tensor]:
    """A server's answer to groups `inputs` -> one output per input, each of its input's shape and
    dtype; Unavailable naming the server otherwise (a bad answer is the server's failure)."""
    if len(reply.outputs) != len(inputs):
        raise Unavailable("experts", f"expert server {address} answered {len(reply.outputs)} of {len(inputs)} groups")
    outputs = []
    for i, (message, x) in enumerate(zip(reply.outputs, inputs)):
        try:
            output = decode(message, f"outputs[{i}]")
        except RequestError as error:
            raise Unavailable("experts", f"expert server {address} sent a bad tensor: {error}") from error
        if output.shape != x.shape or output.dtype != x.dtype:
            raise Unavailable("experts", f"expert server {address} answered {list(output.shape)} "
                                         f"{output.dtype} for {list(x.shape)} {x.dtype}")
        outputs.append(output)
    return outputs
