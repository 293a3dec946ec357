"""The ``engine`` command (also ``python -m engine``). Each subcommand is a thin shell over a module.

Errors of the project's hierarchy print one line (``error: ...``) and exit with status 2; nothing
prints a stack trace for a bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine import logs
from engine._version import __version__
from engine.errors import EngineError
from engine.limits import (
    DEFAULT_MAX_NEW_TOKENS_LIMIT,
    DEFAULT_MAX_PROMPT_BYTES,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
)

DESCRIPTION = """\
FLAN-T5 inference engine: quantized CTranslate2 models, contrastive search, dynamic batching,
gRPC + REST. Typical use:

  engine demo-model --output models/demo         # random weights, FLAN-T5-small shapes (offline)
  engine convert google/flan-t5-small --output models/flan-t5-small
  engine generate --model models/flan-t5-small --prompt "Translate to German: hello"
  engine keys create --name alice
  engine serve --model models/flan-t5-small
"""


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", choices=["cpu", "cuda", "auto"], default=None, help="where to run (default cpu)"
    )
    p.add_argument(
        "--compute-type",
        default=None,
        help="CTranslate2 compute type (default: int8 on CPU, float16 on CUDA; e.g. float32, int8_float16)",
    )
    p.add_argument(
        "--intra-threads", type=int, default=None, help="threads per engine call (0 = one per core)"
    )
    p.add_argument("--inter-threads", type=int, default=None, help="engine calls in parallel (default 1)")


def _environment_help(flag_dests: set[str]) -> str:
    """The serve help's epilog: every setting as ENGINE_<NAME>, and those with no flag."""
    from dataclasses import MISSING, fields

    from engine.config import Config

    lines = [
        "Every setting can also come from the environment as ENGINE_<NAME> (ENGINE_HTTP_PORT=8000);",
        "a flag wins over the environment. Settings with no flag:",
    ]
    for f in fields(Config):
        if f.name not in flag_dests and f.default is not MISSING:
            default = ("1" if f.default else "0") if isinstance(f.default, bool) else repr(f.default)
            lines.append(f"  ENGINE_{f.name.upper()} (default {default})")
    lines.append("Booleans: 1/0, true/false, yes/no, on/off.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face T5/FLAN-T5/mT5 checkpoint to a model folder")
    p.add_argument("source", help="Hub model id (google/flan-t5-small) or a local checkpoint folder")
    p.add_argument("--output", "-o", required=True, type=Path, help="model folder to create")
    p.add_argument(
        "--quantization",
        "-q",
        default="int8",
        help="int8 (default), int8_float32, int8_float16, int8_bfloat16, float16, bfloat16, float32",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")

    p = sub.add_parser("demo-model", help="build a random-weight model with FLAN-T5's real shapes (offline)")
    p.add_argument("--output", "-o", required=True, type=Path, help="model folder to create")
    p.add_argument("--size", choices=["small", "base", "large"], default="small")
    p.add_argument("--seed", type=int, default=0, help="weights and tokenizer are deterministic for a seed")
    p.add_argument("--quantization", "-q", default="int8", help="as for convert (default int8)")
    p.add_argument(
        "--hf-output",
        type=Path,
        default=None,
        help="also write the same weights as a Hugging Face checkpoint folder (for the reference)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")

    p = sub.add_parser("generate", help="generate offline, without a server")
    p.add_argument("--model", "-m", required=True, type=Path, help="model folder")
    p.add_argument("--prompt", "-p", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument(
        "--params", default=None, help="decoding parameters as JSON, e.g. '{\"max_new_tokens\": 32}'"
    )
    p.add_argument("--json", action="store_true", help="print completion, token_ids and usage as JSON")
    _add_runtime_flags(p)

    p = sub.add_parser("serve", help="start the gRPC service and the REST shim")
    p.add_argument("--model", "-m", dest="model_dir", default=None, help="model folder (default: see README)")
    p.add_argument("--http-host", default=None, help="REST bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None, help="REST port (default 8080)")
    p.add_argument("--grpc-host", default=None, help="gRPC bind address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051)")
    p.add_argument(
        "--grpc-target",
        default=None,
        help="serve only the REST shim, forwarding to the gRPC server at HOST:PORT",
    )
    p.add_argument(
        "--public-url",
        default=None,
        help="base URL for responseUrl, e.g. the load balancer's https://api.example.com when several "
        "replicas share a Redis store behind it (default: the request's host)",
    )
    p.add_argument(
        "--store",
        dest="store_url",
        default=None,
        help="sqlite:///path/engine.db (default sqlite:///./data/engine.db; one server per file) or "
        "redis://[:password@]host:port/db[?prefix=engine:&lease_s=30&timeout_s=1] for several servers",
    )
    _add_runtime_flags(p)
    g = p.add_argument_group("batcher and queue")
    g.add_argument("--max-batch-size", type=int, default=None, help="prompts per engine call (default 32)")
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="prompt + new tokens per engine call (default 16384)",
    )
    g.add_argument(
        "--max-queue-delay-ms", type=float, default=None, help="longest wait for a fuller batch (default 2)"
    )
    g.add_argument(
        "--greedy-lane",
        choices=("auto", "continuous", "batch"),
        default=None,
        help="where greedy requests run: continuous (our decoder's batch, rows join and leave between "
        "steps), batch (one-shot batched calls) or auto (continuous on CPU int8, where it measured "
        "faster; default)",
    )
    g.add_argument("--max-queue-size", type=int, default=None, help="queued jobs before 429 (default 10000)")
    g.add_argument(
        "--max-queued-tokens",
        type=int,
        default=None,
        help="prompt tokens queued on the server before 429: bounds the memory of queued work (default 2000000)",
    )
    g.add_argument(
        "--max-queued-jobs-per-key",
        type=int,
        default=None,
        help="queued jobs of one API key before 429 (default 2000)",
    )
    g.add_argument(
        "--max-queued-tokens-per-key",
        type=int,
        default=None,
        help="prompt tokens queued for one API key before 429 (default 500000)",
    )
    g.add_argument(
        "--job-timeout-s", type=float, default=None, help="fail jobs waiting or running longer (default 600)"
    )
    g.add_argument("--result-ttl-s", type=float, default=None, help="keep results this long (default 86400)")
    g.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=None,
        help=f"largest max_new_tokens (default {DEFAULT_MAX_NEW_TOKENS_LIMIT})",
    )
    g.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=None,
        help=f"prompts in one request (default {DEFAULT_MAX_PROMPTS_PER_REQUEST})",
    )
    g.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=None,
        help=f"UTF-8 bytes of one prompt; the HTTP body and gRPC message limits follow from it "
        f"(default {DEFAULT_MAX_PROMPT_BYTES})",
    )
    g.add_argument(
        "--rate-limit-per-minute",
        type=int,
        default=None,
        help="requests per API key per minute, 0 = off (default 600)",
    )
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="text, or json: one object per line with job_id and key_name where known (default text)",
    )
    g.add_argument(
        "--access-log",
        action="store_true",
        default=None,
        help="log one line per HTTP request: method, path, status, duration, job and key name (default off)",
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _environment_help({a.dest for a in p._actions})

    p = sub.add_parser("keys", help="manage API keys")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    k = ksub.add_parser("create", help="create a key; prints it alone on the last line (shown once)")
    k.add_argument("--name", required=True)
    k.add_argument("--store", dest="store_url", default=None)
    k = ksub.add_parser("list", help="list keys (names and creation times, never the keys)")
    k.add_argument("--store", dest="store_url", default=None)
    k = ksub.add_parser("revoke", help="revoke a key by name")
    k.add_argument("name")
    k.add_argument("--store", dest="store_url", default=None)
    return parser


def _runtime_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "compute_type": args.compute_type,
        "intra_threads": args.intra_threads,
        "inter_threads": args.inter_threads,
    }


def cmd_convert(args: argparse.Namespace) -> int:
    from engine.model.convert import convert_model

    manifest = convert_model(args.source, args.output, args.quantization, force=args.force)
    print(f"converted {manifest.source} ({manifest.quantization}) to {args.output}")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from engine.model.demo import build_demo_model

    build_demo_model(
        args.output,
        size=args.size,
        seed=args.seed,
        quantization=args.quantization,
        hf_output=args.hf_output,
        force=args.force,
    )
    print(f"demo model ({args.size}, seed {args.seed}, RANDOM WEIGHTS) written to {args.output}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.config import Config
    from engine.runtime.engine import Engine
    from engine.runtime.params import DecodingParams

    try:
        raw = json.loads(args.params) if args.params else {}
    except json.JSONDecodeError as exc:
        from engine.errors import InvalidRequest

        raise InvalidRequest(f"--params is not valid JSON: {exc}") from exc
    cfg = Config.build({**_runtime_flags(args), "model_dir": str(args.model)})
    params = DecodingParams.from_dict(raw, max_new_tokens_limit=cfg.max_new_tokens_limit)
    engine = Engine.from_config(cfg)
    results = engine.generate(args.prompt, **params.to_dict())
    if args.json:
        usage = {
            "prompt_tokens": sum(r.usage.prompt_tokens for r in results),
            "completion_tokens": sum(r.usage.completion_tokens for r in results),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        out = {
            "completion": [r.text for r in results],
            "token_ids": [list(r.token_ids) for r in results],
            "usage": usage,
        }
        print(json.dumps(out))
    else:
        for r in results:
            print(r.text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.api.server import serve
    from engine.config import Config

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    config = Config.build(flags)
    logs.configure(config.log_format, verbose=args.verbose)
    return serve(config)


def cmd_keys(args: argparse.Namespace) -> int:
    from engine.api.keys import run_keys_command
    from engine.config import Config

    cfg = Config.build({"store_url": args.store_url})
    logs.configure(cfg.log_format, verbose=args.verbose)
    return run_keys_command(args, cfg)


COMMANDS = {
    "convert": cmd_convert,
    "demo-model": cmd_demo_model,
    "generate": cmd_generate,
    "serve": cmd_serve,
    "keys": cmd_keys,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("text", verbose=args.verbose)  # serve and keys switch to the configured format
    try:
        return COMMANDS[args.command](args)
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
