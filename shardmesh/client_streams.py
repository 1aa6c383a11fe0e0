"""The token streams of the client SDK: what `Client.generate` / `AsyncClient.generate` return.

Each wraps one Generate call, turns responses into `Token`s and errors into typed
`ShardmeshError`s, and cancels the call when closed, so the router frees the sequence at once.
"""

import asyncio

import grpc

from shardmesh.client_errors import ShardmeshError, from_rpc_error
from shardmesh.client_types import Token, token_from_response


class TokenStream:
    """Iterator of `Token`s of one Generate call. `close()` (or leaving a `with` block) cancels it."""

    def __init__(self, call):
        self._call = call
        self._closed = False

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
        if self._closed:
            raise StopIteration
        try:
            response = next(self._call)
        except StopIteration:
            self._closed = True
            raise
        except grpc.RpcError as error:
            if self._closed:  # close() from another thread while this one waited
                raise StopIteration from None
            self._closed = True
            raise from_rpc_error(error) from error
        try:
            return token_from_response(response)
        except ShardmeshError:
            self.close()
            raise

    def close(self) -> None:
        """Cancel the call if it is still running (the router frees the sequence); idempotent."""
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncTokenStream:
    """Async iterator of `Token`s of one Generate call. `aclose()` (or `async with`) cancels it.

    Dropping it unfinished (e.g. `break` out of `async for`) cancels the call too: grpc.aio's
    call object sits in reference cycles of the event loop and would otherwise live on.
    """

    def __init__(self, call):
        self._call = call
        self._closed = False
        self._loop = asyncio.get_running_loop()

    def __del__(self):
        if getattr(self, "_closed", True):
            return
        try:
            if asyncio.get_running_loop() is self._loop:
                self._call.cancel()
                return
        except RuntimeError:  # no running loop in this thread (a GC pass elsewhere)
            pass
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._call.cancel)

    def __aiter__(self) -> "AsyncTokenStream":
        return self

    async def __anext__(self) -> Token:
        if self._closed:
            raise StopAsyncIteration
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as error:
            self._closed = True
            raise from_rpc_error(error) from error
        except asyncio.CancelledError:  # grpc.aio has cancelled the call as well
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):  # aclose() from another task
                raise StopAsyncIteration from None
            self._closed = True
            raise
        if response is grpc.aio.EOF:
            self._closed = True
            raise StopAsyncIteration
        try:
            return token_from_response(response)
        except ShardmeshError:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Cancel the call if it is still running (the router frees the sequence); idempotent."""
        self._closed = True
        self._call.cancel()

    async def __aenter__(self) -> "AsyncTokenStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()
