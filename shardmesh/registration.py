"""Keeping a server registered with the router (stage and expert servers): the first registration,
then one every few seconds, so that a router that restarts gets its servers back."""

import asyncio
import logging

import grpc

from shardmesh.grpc_util import register_with_router
from shardmesh.security import Security
from shardmesh.v1 import router_pb2

log = logging.getLogger(__name__)

REREGISTER_INTERVAL_S = 5.0  # servers register again this often: a restarted router has them back within it


class RouterRegistration:
    """Keeps one server registered with the router.

    `register()`: the first registration (retrying while the router is unreachable, as
    register_with_router); `start()`: then one every `interval` s in the background, so a router
    that restarted gets its servers back (the router treats a registration that changes nothing as
    a no-op). `make_request()` builds each request (what the server holds now); `on_reply(reply)`
    may act on the router's answer and return True to register again at once (an expert server
    told to hold its assigned experts, RegisterServerResponse.reassigned)."""

    def __init__(self, router_address: str, make_request, security: Security | None = None,
                 interval: float = REREGISTER_INTERVAL_S, on_reply=None):
        if not interval > 0:
            raise ValueError(f"re-registration interval {interval} must be > 0")
        self.router_address, self.make_request, self.security = router_address, make_request, security
        self.interval, self.on_reply = interval, on_reply
        self._task: asyncio.Task | None = None

    async def register(self, timeout: float = 120.0) -> router_pb2.RegisterServerResponse:
        for _ in range(3):  # a reassigned server registers again once it holds its assignment
            reply = await register_with_router(self.router_address, self.make_request(), timeout, self.security)
            if self.on_reply is None or not await self.on_reply(reply):
                return reply
        raise TimeoutError(f"router at {self.router_address} kept reassigning this server's experts")

    def start(self) -> "RouterRegistration":
        self._task = asyncio.create_task(self._keep_registered())
        return self

    async def _keep_registered(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.register(timeout=self.interval)
            except (TimeoutError, ConnectionError, grpc.aio.AioRpcError) as error:  # ConnectionError: TLS
                if not failing:  # once per outage, not every interval
                    log.warning("registering again with the router at %s failed (%s); retrying every %.1f s",
                                self.router_address, error.details() if isinstance(error, grpc.aio.AioRpcError)
                                else error, self.interval)
                failing = True
                continue
            except Exception:  # never let the loop die: the next interval tries again
                log.exception("registering again with the router at %s failed", self.router_address)
                continue
            if failing:
                log.info("registered again with the router at %s", self.router_address)
            failing = False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
