"""shardmesh: serve language models split across a mesh of gRPC services.

Importing this package is cheap and needs neither torch nor grpc; the client SDK lives in
`shardmesh.client` and needs only grpcio and protobuf.
"""

__version__ = "0.1.0"
