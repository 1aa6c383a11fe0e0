"""Run one service in this process until SIGINT/SIGTERM: what `shardmesh router|stage|expert`
and every container run."""

import argparse
import asyncio
import logging
import os
import pathlib
import signal


log = logging.getLogger("shardmesh")
DEFAULT_PREFILL_CHUNK_TOKENS = 128  # the router's --prefill-chunk-tokens (see shardmesh.scheduler)


def add_service_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--model", required=True, type=pathlib.Path, help="checkpoint directory (safetensors)")
    parser.add_argument("--topology", type=pathlib.Path, help="topology TOML (default: the model's default topology)")
    if role != "router":
        parser.add_argument("--name", required=True, help="this server's name in the topology")
        parser.add_argument("--router", required=True, help="host:port of the router to register with")
        parser.add_argument("--advertise", default="", metavar="HOST[:PORT]",
                            help="address to register with the router (default: --host and the bound port); "
                                 "{hostname} and {ip} expand to this machine's name and address")
        if role == "expert":
            parser.add_argument("--replica-id", default="", help="tells replicas of one expert server apart "
                                "(one scaled service: e.g. {hostname}); default: the only one")
    else:
        parser.add_argument("--max-context", type=int, default=0, help="context limit (default: the model's)")
        parser.add_argument("--port-file", type=pathlib.Path, help="write the bound port here once listening")
        parser.add_argument("--max-batch-sequences", type=int, default=64, metavar="N",
                            help="sequences in one batch step (default %(default)s)")
        parser.add_argument("--max-queued", type=int, default=256, metavar="N",
                            help="requests that may wait for a batch slot; past it Generate gets "
                                 "RESOURCE_EXHAUSTED at once (default %(default)s)")
        parser.add_argument("--micro-batches", type=int, default=0, metavar="M",
                            help="micro-batches in flight through the pipeline (default 0 = one per stage)")
        parser.add_argument("--prefill-chunk-tokens", type=int, default=DEFAULT_PREFILL_CHUNK_TOKENS, metavar="C",
                            help="prompt tokens per micro-batch step, so a long prompt does not stall "
                                 "decoding (0 = whole prompts; default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; binding elsewhere is explicit)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = chosen by the OS)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N: where weights, KV caches and compute live "
                        "(the router holds no weights and only checks it)")
    parser.add_argument("--dtype", default="", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--compute-threads", type=int, default=1, metavar="N",
                        help="threads running independent matmuls of a step in parallel (the experts of a layer, "
                             "slices of the LM head); they sleep when idle, so services taking turns on the same "
                             "cores share them well (default %(default)s; see shardmesh.compute_pool)")
    parser.add_argument("--data-plane", default="shm", choices=["shm", "grpc"],
                        help="shm: tensors to and from services on this host through shared memory, "
                             "negotiated per peer (gRPC bytes with the others); grpc: always in gRPC messages "
                             "(default %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    from shardmesh.security import add_service_security_arguments
    add_service_security_arguments(parser, role)


async def _serve(role: str, args: argparse.Namespace) -> None:
    from shardmesh.security import service_security
    from shardmesh.service_config import ServiceConfig  # imports torch: only when serving

    security = service_security(args, role)  # before loading anything: a missing token fails at once
    config = ServiceConfig(security=security, model_dir=args.model, topology_file=args.topology, name=getattr(args, "name", ""),
                           router_address=getattr(args, "router", ""), host=args.host, port=args.port,
                           advertise_address=getattr(args, "advertise", ""), replica_id=getattr(args, "replica_id", ""),
                           dtype=args.dtype, device=args.device, data_plane=args.data_plane)
    if role == "router":
        from router.main import start_router
        server = await start_router(config, max_context=args.max_context,
                                    max_batch_sequences=args.max_batch_sequences, max_queued=args.max_queued,
                                    micro_batches=args.micro_batches, prefill_chunk_tokens=args.prefill_chunk_tokens)
    elif role == "stage":
        from stage_server.main import start_stage_server
        server = await start_stage_server(config)
    else:
        from expert_server.main import start_expert_server
        server = await start_expert_server(config)
    if role == "router" and args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(server.port))
        os.replace(tmp, args.port_file)  # atomic: a reader never sees a partial number
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("%s: stopping", role)
    await server.stop(grace=5.0)


def run_service(role: str, args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {role} %(name)s %(levelname)s %(message)s")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.compute_threads != 1:
        from shardmesh import compute_pool
        compute_pool.set_threads(args.compute_threads)
    import grpc
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(_serve(role, args))
    except (ValueError, KeyError, FileNotFoundError, TimeoutError) as error:
        log.error("%s failed to start: %s", role, error)
        return 2
    except grpc.aio.AioRpcError as error:
        log.error("%s was refused by the router: %s: %s", role, error.code().name, error.details())
        return 2
    return 0
