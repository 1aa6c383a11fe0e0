"""Run one service in this process until SIGINT/SIGTERM: what `shardmesh router|stage|expert`
and every container run."""

import argparse
import asyncio
import gc
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
        if role == "stage":
            parser.add_argument("--tp-rendezvous", default="", metavar="HOST:PORT",
                                help="shards of a tensor-parallel stage (tp > 1 in the topology): where their group "
                                     "meets; the stage's rank 0 binds it, every shard is given the same")
            parser.add_argument("--tp-rank", choices=["auto"], default=None,
                                help="auto: this process is a shard of the tensor-parallel stage --name (the stage's "
                                     "name, not \"/tpN\"); the router assigns its rank and tells it where its group "
                                     "meets (see router/tp_ranks.py). Without it a shard's rank is in its name and, "
                                     "without --tp-rendezvous, the router gives the rendezvous")
            parser.add_argument("--tp-shard-id", default="", metavar="ID",
                                help="with a rendezvous from the router: this shard's id, unique in its stage and the "
                                     "same across its restarts, e.g. {hostname} in a container (default: host name "
                                     "and process id)")
            parser.add_argument("--tp-join-timeout", type=float, default=120.0, metavar="SECONDS",
                                help="how long the shards of a TP stage wait for each other to join; then the stage "
                                     "is NOT_SERVING with the reason (default %(default)s)")
            parser.add_argument("--tp-collective-timeout", type=float, default=60.0, metavar="SECONDS",
                                help="how long one AllReduce waits for a peer; then the group is lost and the stage "
                                     "NOT_SERVING (default %(default)s)")
        if role == "stage":
            parser.add_argument("--max-cached-sequences", type=int, default=0, metavar="N",
                                help="sequences this stage's KV cache may hold; a step that starts one more gets "
                                     "RESOURCE_EXHAUSTED naming it (default 0 = no limit; keep it >= the router's "
                                     "--max-batch-sequences)")
        if role == "expert":
            parser.add_argument("--assignment-file", type=pathlib.Path, metavar="PATH",
                                help="keep the experts a live rebalance gave this server here (JSON), and load them "
                                     "from it at start, so they survive a restart of this server and the router "
                                     "together (default: none; a restarted router adopts them from live servers)")
        parser.add_argument("--replica-id", default="", help="tells replicas of one server apart: an expert server "
                            "scaled to several (e.g. {hostname}), a stage's standbys (topology `standbys`); "
                            "default: the only one (a stage's first, active one)")
    else:
        parser.add_argument("--max-context", type=int, default=0, help="context limit (default: the model's)")
        parser.add_argument("--port-file", type=pathlib.Path, help="write the bound port here once listening")
        parser.add_argument("--max-batch-sequences", type=int, default=64, metavar="N",
                            help="sequences in one batch step (default %(default)s)")
        parser.add_argument("--max-queued", type=int, default=256, metavar="N",
                            help="requests that may wait for a batch slot; past it Generate gets "
                                 "RESOURCE_EXHAUSTED at once (default %(default)s)")
        parser.add_argument("--max-sequences-per-caller", type=int, default=0, metavar="N",
                            help="sequences one caller may hold (queued or running); past it its Generate gets "
                                 "RESOURCE_EXHAUSTED at once (default 0 = no limit; router/caller_limit.py)")
        parser.add_argument("--caller-identity", choices=("host", "connection", "token"), default="host",
                            help="who one caller is for --max-sequences-per-caller and the tarpit: a peer host, one "
                                 "client connection (a TLS client certificate's subject in both), or the name of "
                                 "its client token (--auth-tokens-file) (default %(default)s)")
        parser.add_argument("--tarpit-refusals-per-second", type=float, default=50.0, metavar="R",
                            help="a caller refused (RESOURCE_EXHAUSTED, admission queue full) faster than R/s gets "
                                 "its further refusals only after a delay of 0.1-0.5 s, which slows a client "
                                 "retrying without backoff; others are refused at once (default %(default)s; "
                                 "0 = off; router/tarpit.py)")
        parser.add_argument("--micro-batches", type=int, default=0, metavar="M",
                            help="micro-batches in flight through the pipeline (default 0 = one per stage)")
        parser.add_argument("--prefill-chunk-tokens", type=int, default=DEFAULT_PREFILL_CHUNK_TOKENS, metavar="C",
                            help="prompt tokens per micro-batch step, so a long prompt does not stall "
                                 "decoding (0 = whole prompts; default %(default)s)")
        parser.add_argument("--step-timeout", type=float, default=10.0, metavar="SECONDS",
                            help="a step's deadline at each stage: this plus 0.05 s per token of the step; past "
                                 "it the stage is probed and, if it does not answer, replaced by a standby or "
                                 "reported unservable (default %(default)s; see router/failover.py)")
        parser.add_argument("--shutdown-grace", type=float, default=20.0, metavar="SECONDS",
                            help="on SIGTERM: health NOT_SERVING and new requests refused at once, streams in "
                                 "flight may finish within this (default %(default)s)")
        parser.add_argument("--auto-rebalance", type=float, default=0.0, metavar="IMBALANCE",
                            help="re-place experts when the busiest expert server's load / mean stays above this "
                                 "(> 1) for 3 checks in a row (default 0 = off; see router/auto_rebalance.py)")
        parser.add_argument("--auto-rebalance-interval", type=float, default=30.0, metavar="SECONDS",
                            help="between auto-rebalance checks (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; binding elsewhere is explicit)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = chosen by the OS)")
    parser.add_argument("--device", default="", help="cpu or cuda:N: where weights, KV caches and compute live "
                        "(default: this server's `device` in the topology file, else cpu; the router holds no "
                        "weights and only checks it)")
    parser.add_argument("--dtype", default="", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--compute-threads", type=int, default=1, metavar="N",
                        help="threads running independent matmuls of a step in parallel (the experts of a layer, "
                             "slices of the LM head); they sleep when idle, so services taking turns on the same "
                             "cores share them well (default %(default)s; see shardmesh.compute_pool)")
    parser.add_argument("--loop-cpu", type=int, default=None, metavar="CPU",
                        help="run the event loop's thread on this CPU and every other thread of the service on "
                             "the others: give every service of a host that takes turns (one micro-batch) the "
                             "same CPU, and a hand-off between them wakes no idle CPU (default: off; implies "
                             "--threads 1; see shardmesh.loop_cpu)")
    parser.add_argument("--data-plane", default="shm", choices=["shm", "grpc", "nccl"],
                        help="shm: tensors to and from services on this host through shared memory, "
                             "negotiated per peer (gRPC bytes with the others); grpc: always in gRPC messages; "
                             "nccl: stage <-> expert tensors over NCCL links formed through the control plane "
                             "(gloo point to point for CPU services, which must share a host), the router's in "
                             "gRPC messages (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one JSON object per line, with request_id where known (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = the OS chooses; default off)")
    parser.add_argument("--otlp-endpoint", default="", metavar="HOST:PORT",
                        help="export OpenTelemetry traces over OTLP/gRPC to this collector (default off; TLS: --otlp-ca)")
    parser.add_argument("--otlp-ca", type=pathlib.Path, metavar="PEM",
                        help="with --otlp-endpoint: TLS to the collector, its certificate verified with this CA "
                             "(default: plaintext, unless OpenTelemetry's OTEL_EXPORTER_OTLP_INSECURE / "
                             "_CERTIFICATE variables or an https:// endpoint say otherwise)")
    parser.add_argument("--trace-sample-ratio", type=float, default=1.0, metavar="R",
                        help="with --otlp-endpoint: the share of requests the router traces, by trace id; other "
                             "services follow the caller's decision (default %(default)s)")
    from shardmesh.security import add_service_security_arguments
    add_service_security_arguments(parser, role)


async def _serve(role: str, args: argparse.Namespace) -> None:
    from shardmesh.security import service_security
    from shardmesh.service_config import ServiceConfig  # imports torch: only when serving

    security = service_security(args, role)  # before loading anything: a missing token fails at once
    config = ServiceConfig(security=security, model_dir=args.model, topology_file=args.topology, name=getattr(args, "name", ""),
                           router_address=getattr(args, "router", ""), host=args.host, port=args.port,
                           advertise_address=getattr(args, "advertise", ""), replica_id=getattr(args, "replica_id", ""),
                           tp_rendezvous=getattr(args, "tp_rendezvous", ""),
                           tp_auto_rank=getattr(args, "tp_rank", None) == "auto",
                           tp_shard_id=getattr(args, "tp_shard_id", ""),
                           tp_join_timeout=getattr(args, "tp_join_timeout", 120.0),
                           tp_collective_timeout=getattr(args, "tp_collective_timeout", 60.0),
                           max_cached_sequences=getattr(args, "max_cached_sequences", 0),
                           dtype=args.dtype, device=args.device, data_plane=args.data_plane,
                           assignment_file=getattr(args, "assignment_file", None))
    _start_telemetry(role, args)  # before serving: a bad --metrics-port fails at once
    if role == "router":
        from router.auto_rebalance import AutoRebalanceConfig
        from router.main import start_router
        from router.tarpit import TarpitConfig
        auto = (AutoRebalanceConfig(args.auto_rebalance, args.auto_rebalance_interval)
                if args.auto_rebalance else None)
        server = await start_router(config, max_context=args.max_context,
                                    max_batch_sequences=args.max_batch_sequences, max_queued=args.max_queued,
                                    micro_batches=args.micro_batches, prefill_chunk_tokens=args.prefill_chunk_tokens,
                                    auto_rebalance=auto, step_timeout=args.step_timeout,
                                    max_sequences_per_caller=args.max_sequences_per_caller,
                                    caller_identity=args.caller_identity,
                                    tarpit=TarpitConfig(args.tarpit_refusals_per_second)
                                    if args.tarpit_refusals_per_second else None)
    elif role == "stage":
        from stage_server.main import start_stage_server
        server = await start_stage_server(config)
    else:
        from expert_server.main import start_expert_server
        server = await start_expert_server(config)
    if args.loop_cpu is not None:
        from shardmesh import loop_cpu
        loop_cpu.pin(args.loop_cpu)  # after start-up: gRPC's threads exist, the kernels are loaded
    _freeze_startup_objects()
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
    await server.stop(grace=args.shutdown_grace if role == "router" else 5.0)
    from shardmesh.telemetry import tracing
    tracing.shutdown()  # flush spans


def _freeze_startup_objects() -> None:
    """Keep the cyclic garbage collector off what start-up made (modules, torch, the model's Python
    objects, all living as long as the process) and make its young collections rarer. A full
    collection walks every tracked object: ~65 ms on the event loop (181,000 objects once the
    services' modules are imported, before any model), in the middle of some decode step; frozen,
    they are never walked again. Reference counting still frees what serving drops, and cycles made
    later are still collected. (A decoding mesh: 4-10 young collections per service per 10 s, 1-5 ms
    in all; none with these settings.)"""
    gc.collect()
    gc.freeze()  # what exists now: never scanned again
    gc.set_threshold(10_000, 10, 10)  # young collections every 10,000 net allocations, not 700


def _start_telemetry(role: str, args: argparse.Namespace) -> None:
    service = getattr(args, "name", "") or role
    if args.metrics_port is not None:
        from shardmesh.telemetry import metrics
        if not 0 <= args.metrics_port < 65536:
            raise ValueError(f"--metrics-port {args.metrics_port} is not in [0, 65535]")
        try:
            port = metrics.serve(args.host, args.metrics_port).server_port
        except OSError as error:
            raise ValueError(f"--metrics-port {args.metrics_port}: cannot listen on {args.host}: {error}") from None
        log.info("%s: metrics at http://%s:%d/metrics", service, args.host, port)  # tests read the port here
    if args.otlp_endpoint:
        from shardmesh.telemetry import tracing
        if not 0 < args.trace_sample_ratio <= 1:
            raise ValueError(f"--trace-sample-ratio {args.trace_sample_ratio} is not in (0, 1]")
        tracing.configure(args.otlp_endpoint, f"shardmesh-{service}", sample_ratio=args.trace_sample_ratio,
                          ca_file=args.otlp_ca)


def run_service(role: str, args: argparse.Namespace) -> int:
    from shardmesh.telemetry import logs
    logs.configure(getattr(args, "name", "") or role, args.log_level, args.log_format)
    if args.loop_cpu is not None:
        from shardmesh import loop_cpu
        args.threads = args.threads or 1
        try:
            loop_cpu.check(args.loop_cpu, args.threads)
        except ValueError as error:
            log.error("%s failed to start: %s", role, error)
            return 2
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
    except (ValueError, KeyError, FileNotFoundError, TimeoutError, ConnectionError) as error:  # TLSHandshakeError too
        log.error("%s failed to start: %s", role, error)
        return 2
    except grpc.aio.AioRpcError as error:
        log.error("%s was refused by the router: %s: %s", role, error.code().name, error.details())
        return 2
    return 0
