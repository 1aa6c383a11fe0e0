"""`shardmesh generate`: stream tokens from a running mesh to the terminal (client SDK only, no torch).

    shardmesh generate --router 127.0.0.1:50051 --prompt "Once upon a time" --max-new-tokens 32
    shardmesh generate --router 127.0.0.1:50051 --prompt-ids 1,15043,3186 --output jsonl
    shardmesh generate --router HOST:PORT --token-file FILE --tls-ca ca.pem --prompt "..."

The router's bearer token comes from --token-file, else $SHARDMESH_AUTH_TOKEN (`shardmesh up`
prints its file). --tls-ca makes the channel TLS; --tls-cert/--tls-key add a client certificate
for a router that requires mutual TLS.

Tokens go to stdout as they arrive; a one-line summary (finish reason, counts, time) goes to
stderr. A failed call prints `shardmesh generate: CODE: details` to stderr and exits 1.
"""

import argparse
import json
import sys
import time

from shardmesh.client import Client, ShardmeshError
from shardmesh.client_types import DEFAULT_MAX_NEW_TOKENS, Token
from shardmesh.security import CLIENT_TOKEN_ENV, add_tls_arguments, client_credentials, read_token

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _token_ids(text: str) -> list[int]:
    """Parse "1,2,3" (spaces allowed) into token ids."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `generate` subcommand to an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser("generate", help="generate tokens from a running mesh",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", required=True, metavar="HOST:PORT", help="the router's address")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (the mesh's checkpoint must carry a tokenizer)")
    prompt.add_argument("--prompt-ids", type=_token_ids, metavar="ID,ID,...", help="prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter (default)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]; default 1")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    parser.add_argument("--stop-token-ids", type=_token_ids, default=[], metavar="ID,ID,...")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's eos token")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="deadline of the whole generation (default: none)")
    parser.add_argument("--wait-serving", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the mesh to be serving (default: do not wait)")
    parser.add_argument("--token-file", metavar="FILE", help=f"the router's bearer token (else ${CLIENT_TOKEN_ENV})")
    add_tls_arguments(parser, client=True)
    parser.add_argument("--output", choices=("auto", "text", "ids", "jsonl"), default="auto",
                        help="auto (default): ids for --prompt-ids, else text (a token without text: its id); "
                             "jsonl: one object per token")
    parser.set_defaults(run=run)
    return parser


def _show(token: Token, output: str) -> str:
    if output == "jsonl":
        return json.dumps({"token_id": token.token_id, "text": token.text, "index": token.index,
                           "finish_reason": token.finish_reason, "prompt_tokens": token.prompt_tokens}) + "\n"
    if output == "text" or (output == "auto" and token.text):
        return token.text
    return f"{token.token_id} "


def run(args: argparse.Namespace) -> int:
    """Run `shardmesh generate` with parsed arguments; returns the exit code."""
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    output = args.output if args.output != "auto" else ("ids" if args.prompt is None else "auto")
    start = time.monotonic()
    last = None
    count = 0
    try:
        token = read_token(args.token_file, CLIENT_TOKEN_ENV)
        credentials = (client_credentials(args.tls_ca, args.tls_cert, args.tls_key)
                       if args.tls_ca or args.tls_cert or args.tls_key else None)
    except (OSError, ValueError) as error:
        print(f"shardmesh generate: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        with Client(args.router, timeout=args.timeout, token=token, credentials=credentials) as client:
            if args.wait_serving > 0:
                client.wait_until_serving(timeout=args.wait_serving)
            with client.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos) as stream:
                for last in stream:
                    count += 1
                    sys.stdout.write(_show(last, output))
                    sys.stdout.flush()
    except ShardmeshError as error:
        _end_line(count, output)
        print(f"shardmesh generate: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # leaving the `with` blocks cancelled the call
        _end_line(count, output)
        print("shardmesh generate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    _end_line(count, output)
    prompt_tokens = last.prompt_tokens if last is not None else 0
    reason = last.finish_reason if last is not None else None
    print(f"[finish_reason={reason} prompt_tokens={prompt_tokens} new_tokens={count} "
          f"seconds={time.monotonic() - start:.2f}]", file=sys.stderr)
    return 0


def _end_line(count: int, output: str) -> None:
    """End the streamed line on stdout (jsonl lines end themselves)."""
    if count and output != "jsonl":
        sys.stdout.write("\n")
        sys.stdout.flush()
