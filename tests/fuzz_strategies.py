"""Hypothesis strategies for the property-based tests of every RPC (tests/test_fuzz_*.py), and the
check each answer must pass.

Every strategy yields the *bytes* of one request: mostly a structurally valid message whose fields
are hostile (boundary and huge numbers, negative ids, NaN and infinite floats, wrong dtypes, shapes
and byte lengths, tensors that are almost right), sometimes random bytes, and sometimes a valid
message cut short or with a byte flipped. Requests go through raw stubs (wire_helpers.raw_call),
so nothing on our side re-checks them."""

import asyncio
import math
import random
import re
import struct

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from shardmesh.v1 import tensor_pb2

# derandomize: the same examples on every run (CI must not flake on a new one); no database:
# nothing written next to the checkout. Each example sends a batch of requests (see `batches`).
REQUESTS_PER_RPC = 2000
BATCH = 10  # requests per example, sent concurrently: one example's overhead shared by ten calls
FUZZ_SETTINGS = settings(max_examples=REQUESTS_PER_RPC // BATCH, deadline=None, derandomize=True, database=None, print_blob=True,
                         suppress_health_check=list(HealthCheck))

# A precise refusal names its field first: "field: why" (field like groups[1].hidden_states.data).
FIELD_DETAILS = re.compile(r"^[A-Za-z_][\w.\[\]]*: \S")
IMPRECISE = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}

U32 = st.one_of(st.integers(0, 8), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
U64 = st.one_of(st.integers(0, 8), st.sampled_from([2**32, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
I64 = st.one_of(st.integers(-2, 8), st.sampled_from([-2**63, 2**31, 2**32, 2**63 - 1]), st.integers(-2**63, 2**63 - 1))
F32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, 1e-45, 3.4e38]))
ENUM = st.one_of(st.integers(0, 6), st.sampled_from([-1, 99, 2**31 - 1, -2**31]))
TEXT = st.one_of(st.text(max_size=24), st.sampled_from(["", " ", "\x00", "é" * 5, "../../etc/passwd", "a" * 300]))


def address_strategy(genuine: list[str]) -> st.SearchStrategy:
    """host:port strings: the mesh's own addresses, and malformed or impossible ones."""
    port = st.one_of(st.sampled_from(["0", "-1", "65536", "70000", "http", "", "1e3", "99999999999999999999"]),
                     st.integers(0, 2**32).map(str))
    host = st.sampled_from(["127.0.0.1", "", "[::1]", "::1", "localhost", "256.1.1.1", "a b", "\x00"])
    return st.one_of(st.sampled_from(genuine), st.builds(lambda h, p: f"{h}:{p}", host, port), TEXT)


@st.composite
def perturbed(draw, message_type, genuine: dict, hostile: dict, most: int = 2):
    """`message_type(**genuine)` with up to `most` of its fields replaced by a draw from `hostile`
    (field -> strategy): mostly valid requests that reach deep into the server, each wrong in a
    field or two."""
    fields = dict(genuine)
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), max_size=most, unique=True)):
        value = draw(hostile[name])
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return message_type(**fields)


@st.composite
def float_bytes(draw, count: int) -> bytes:
    """`count` float32 values as little-endian bytes: seeded normal values with a few NaN, infinite
    or huge ones poked in, or any bits. (Drawing each float with hypothesis costs ~100x more.)"""
    if count and draw(st.integers(0, 3)) == 0:
        return draw(st.binary(min_size=4 * count, max_size=4 * count))
    generator = random.Random(draw(st.integers(0, 2**16)))
    values = [generator.gauss(0.0, 1.0) for _ in range(count)]
    for _ in range(draw(st.integers(0, 2))) if count else ():
        values[draw(st.integers(0, count - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -0.0]))
    return struct.pack(f"<{count}f", *values)


@st.composite
def tensors(draw, rows: st.SearchStrategy = st.integers(0, 6), width: int = 32, kind: str = "float",
            modes=("right", "right", "wrong_width", "wrong_dtype", "byte_length", "any", "shm")) -> tensor_pb2.Tensor:
    """A Tensor: often almost right (right dtype and width, data matching or off by a little),
    otherwise any dtype, shape and data; now and then a shared-memory span (refused over gRPC).
    modes=("right",): always the right dtype, shape and byte length (ids mostly in range)."""
    mode = draw(st.sampled_from(modes))
    n = draw(rows)
    dtype = tensor_pb2.DTYPE_INT64 if kind == "ids" else tensor_pb2.DTYPE_FLOAT32
    if mode in ("right", "byte_length", "shm"):
        shape = [n] if kind == "ids" else [n, width]
    elif mode == "wrong_width":
        shape = [n] + draw(st.lists(st.integers(0, width + 2), max_size=3))
    else:
        shape = draw(st.lists(I64, max_size=4))
    if mode == "wrong_dtype":
        dtype = draw(st.sampled_from([d for d in range(1, 6) if d != dtype]))
    elif mode == "any":
        dtype = draw(ENUM)
    itemsize = {1: 4, 2: 2, 3: 2, 4: 8, 5: 4}.get(dtype, 4)
    numel = 1
    for dim in shape:
        numel *= dim
    fits = 0 <= numel * itemsize <= 4096
    if mode == "shm":
        span = tensor_pb2.SharedMemorySpan(offset=draw(U64), length=draw(U64))
        return tensor_pb2.Tensor(dtype=dtype, shape=shape, shm=span)
    if kind == "ids" and fits and mode == "right":
        ids = draw(st.lists(st.one_of(*[st.integers(0, 127)] * 15, I64), min_size=numel, max_size=numel))
        data = struct.pack(f"<{numel}q", *ids)
    elif dtype == tensor_pb2.DTYPE_FLOAT32 and fits and mode != "byte_length":
        data = draw(float_bytes(numel))
    elif fits:
        data = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
    else:
        data = b""
    if mode in ("byte_length", "any"):
        cut = draw(st.integers(-9, 9))
        data = data[:cut] if cut < 0 else data + bytes(cut)
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def mangled(draw, messages: st.SearchStrategy) -> bytes:
    """The serialized message, or that with a byte flipped / cut short / unknown fields, or random bytes."""
    how = draw(st.sampled_from(["as_is"] * 6 + ["flip", "cut", "extra", "random"]))
    if how == "random":
        return draw(st.binary(max_size=64))
    raw = draw(messages).SerializeToString()
    if how == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    if how == "cut" and raw:
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if how == "extra":  # an unknown field (number 100+, any wire type): must be ignored
        tag = (draw(st.integers(100, 2000)) << 3) | draw(st.sampled_from([0, 1, 5]))
        return raw + _varint(tag) + draw(st.sampled_from([b"\x00", bytes(8), bytes(4)]))
    return raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def batches(messages: st.SearchStrategy) -> st.SearchStrategy:
    """BATCH requests' bytes per example."""
    return st.lists(mangled(messages), min_size=BATCH, max_size=BATCH)


def check_answer(rpc: str, request: bytes, code: grpc.StatusCode, details: str) -> None:
    """Never UNKNOWN, INTERNAL or a hang; any refusal names its field ("field: why")."""
    assert code not in IMPRECISE, (rpc, code, details, request)
    if code != grpc.StatusCode.OK:
        assert FIELD_DETAILS.match(details), (rpc, code, details, request)


class Counter:
    """Requests sent per RPC: each test asserts it sent at least REQUESTS_PER_RPC."""

    def __init__(self):
        self.sent: dict[str, int] = {}
        self.codes: dict[str, int] = {}  # status code name -> answers (printed with pytest -s)

    def add(self, rpc: str, codes: list[grpc.StatusCode]) -> None:
        self.sent[rpc] = self.sent.get(rpc, 0) + len(codes)
        for code in codes:
            self.codes[code.name] = self.codes.get(code.name, 0) + 1


async def send_batch(channel, rpc, requests: list[bytes], counter: Counter, timeout: float = 20.0) -> list:
    """Send every request of the batch concurrently over `channel`; check each answer."""
    from wire_helpers import raw_call
    answers = await asyncio.gather(*(raw_call(channel, rpc, request, timeout=timeout) for request in requests))
    for request, (code, details, _) in zip(requests, answers):
        check_answer(rpc.name, request, code, details)
    counter.add(rpc.name, [code for code, _, _ in answers])
    return answers


async def open_channel(address: str) -> grpc.aio.Channel:
    """A plaintext channel made on the running loop (a grpc.aio channel belongs to the loop that made it)."""
    from shardmesh import grpc_util
    return grpc_util.insecure_channel(address)
