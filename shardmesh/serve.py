"""Run one service in this process until SIGINT/SIGTERM: what `shardmesh router|stage|expert`
and every container run."""

import argparse
import asyncio
import logging
import os
import pathlib
import signal


log = logging.getLogger("shardmesh")


def add_service_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--model", required=True, type=pathlib.Path, help="checkpoint directory (safetensors)")
    parser.add_argument("--topology", type=pathlib.Path, help="topology TOML (default: the model's default topology)")
    if role != "router":
        parser.add_argument("--name", required=True, help="this server's name in the topology")
        parser.add_argument("--router", required=True, help="host:port of the router to register with")
    else:
        parser.add_argument("--max-context", type=int, default=0, help="context limit (default: the model's)")
        parser.add_argument("--port-file", type=pathlib.Path, help="write the bound port here once listening")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; binding elsewhere is explicit)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = chosen by the OS)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


async def _serve(role: str, args: argparse.Namespace) -> None:
    from shardmesh.service_config import ServiceConfig  # imports torch: only when serving

    config = ServiceConfig(model_dir=args.model, topology_file=args.topology, name=getattr(args, "name", ""),
                           router_address=getattr(args, "router", ""), host=args.host, port=args.port,
                           dtype=args.dtype)
    if role == "router":
        from router.main import start_router
        server = await start_router(config, max_context=args.max_context)
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
