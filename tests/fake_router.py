"""A fake Router service for client SDK tests: deterministic tokens, no model, no torch.

The servicer runs on a grpc.aio server in a background thread's event loop, so that synchronous
clients, asynchronous clients (in the test's own loop) and subprocesses can all call it.

Generate answers by prompt:
- token ids [.., last]: max_new_tokens tokens, token_id = last + 1 + index, text f"t{token_id} ";
- text: the same with last = len(text) (prompt_tokens = len(text));
- "abort:CODE" / "abort:CODE:N": abort with that status, after N tokens (default 0);
- "hang": one token, then waits until the client cancels (or its deadline passes).
Logits, when asked, are [VOCAB] fp32: token_id + k / 4 for k in range(VOCAB) (exact in fp32).
"""

import asyncio
import struct
import threading

import grpc

from shardmesh.v1 import router_pb2, router_pb2_grpc, tensor_pb2

VOCAB = 8


def expected_logits(token_id: int) -> tuple[float, ...]:
    return tuple(token_id + k / 4 for k in range(VOCAB))


class FakeRouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.requests: list[router_pb2.GenerateRequest] = []
        self.cancelled = threading.Event()  # set when a "hang" call sees its client go away
        self.serving_after = 0              # GetClusterStatus says serving from call serving_after + 1 on
        self.status_calls = 0
        self.status_error: grpc.StatusCode | None = None  # GetClusterStatus aborts with this

    async def Generate(self, request, context):
        self.requests.append(request)
        ids = list(request.prompt_token_ids)
        prompt_tokens = len(ids) or len(request.prompt_text)
        last = ids[-1] if ids else len(request.prompt_text)
        command = request.prompt_text.split(":")
        abort_after = int(command[2]) if command[0] == "abort" and len(command) > 2 else None
        if command[0] == "abort" and abort_after is None:
            await context.abort(grpc.StatusCode[command[1]], f"fake {command[1]} for this prompt")
        for index in range(request.max_new_tokens):
            if index == abort_after:
                await context.abort(grpc.StatusCode[command[1]], f"fake {command[1]} after {index} tokens")
            token_id = last + 1 + index
            finish = router_pb2.FINISH_REASON_UNSPECIFIED
            if token_id in request.stop_token_ids:
                finish = router_pb2.FINISH_REASON_STOP
            elif index == request.max_new_tokens - 1:
                finish = router_pb2.FINISH_REASON_LENGTH
            response = router_pb2.GenerateResponse(token_id=token_id, text=f"t{token_id} ", index=index,
                                                   finish_reason=finish, prompt_tokens=prompt_tokens)
            if request.return_logits:
                response.logits.CopyFrom(tensor_pb2.Tensor(
                    dtype=tensor_pb2.DTYPE_FLOAT32, shape=[VOCAB],
                    data=struct.pack(f"<{VOCAB}f", *expected_logits(token_id))))
            yield response
            if request.prompt_text == "hang":
                try:
                    await asyncio.Event().wait()  # nobody sets it: only cancellation ends this
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
            if finish != router_pb2.FINISH_REASON_UNSPECIFIED:
                return

    async def GetModelInfo(self, request, context):
        return router_pb2.ModelInfo(family="llama", num_layers=4, hidden_size=16, vocab_size=VOCAB,
                                    max_context=64, eos_token_ids=[2], model_fingerprint="fake")

    async def GetClusterStatus(self, request, context):
        self.status_calls += 1
        if self.status_error is not None:
            await context.abort(self.status_error, "fake status error")
        serving = self.status_calls > self.serving_after
        servers = [router_pb2.ServerStatus(name=f"stage-{i}", role=router_pb2.SERVER_ROLE_STAGE,
                                           registered=serving or i == 0,
                                           layers=router_pb2.LayerRange(start=2 * i, end=2 * i + 2))
                   for i in range(2)]
        return router_pb2.ClusterStatus(serving=serving, placement_version=1, servers=servers)


class FakeRouter:
    """Context manager: serves a FakeRouterServicer on 127.0.0.1:<OS-chosen port> in a thread."""

    def __init__(self):
        self.servicer = FakeRouterServicer()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Like the real router: accept the SDK's keepalive pings (every 30 s) during a long call.
        server = grpc.aio.server(options=[("grpc.http2.min_ping_interval_without_data_ms", 5_000)])
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(grace=None)

    def __enter__(self) -> "FakeRouter":
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("fake router did not start within 10 s")
        return self

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
