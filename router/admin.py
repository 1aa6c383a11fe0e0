"""AdminServicer: the router's operator API (admin.proto), thin over router/rebalance.py."""

from shardmesh.grpc_util import translate_errors
from shardmesh.v1 import admin_pb2_grpc

from router.rebalance import Rebalancer
from router.remove import ServerRemover


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, state):
        self.rebalancer = Rebalancer(state)  # state: router.main.RouterState
        self.remover = ServerRemover(state, self.rebalancer)

    @translate_errors
    async def Rebalance(self, request, context):
        return await self.rebalancer.rebalance(request)

    @translate_errors
    async def RemoveServer(self, request, context):
        return await self.remover.remove(request)
