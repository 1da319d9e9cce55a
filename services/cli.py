"""The `tessera` command: run one role (engine, worker, tokenizer), all of them (`up`), or a client (`generate`)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_MODEL = Path(__file__).resolve().parents[1] / "models" / "tessera-demo"
DEFAULT_MODEL = os.environ.get("TESSERA_MODEL", str(REPO_MODEL))
DEFAULT_PORT = 50051


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9' or plain bytes."""
    match = re.fullmatch(r"\s*([\d.e+]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MiB)")
    number, unit = float(match.group(1)), (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * scale[unit])


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face checkpoint directory "
                        "(default: $TESSERA_MODEL or the repository's demo model)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "tpu"],
                        help="where the model runs (default: $TESSERA_DEVICE, else auto: cuda, then tpu, then cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16. auto (the default): "
                        "bfloat16 on CUDA; on a CPU with AVX512-BF16 or AMX, bfloat16 for a float32 or float16 "
                        "checkpoint; else the checkpoint's own")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=parse_bytes("1GiB"),
                        help="memory for KV tensors; the block count follows (default 1GiB)")
    parser.add_argument("--cpu-matmul", default="auto", choices=["auto", "onednn", "aten"],
                        help="CPU linear layers: oneDNN with pre-packed weights, or PyTorch's default (aten); "
                             "auto: oneDNN where it runs (float32/bfloat16), and decode steps of 1-4 requests on "
                             "a native GEMV's copy of the weights when it fits in a quarter of free memory "
                             "(onednn: one copy, oneDNN's); bf16 where oneDNN cannot run it (no AVX-512): every "
                             "batch size on the native kernels' one packed copy")
    parser.add_argument("--quantization", default=None, choices=["int8"],
                        help="CPU: int8 linear layers (weights per channel at load, activations per token; oneDNN's "
                             "int8 GEMM), about a quarter of float32's weight bytes; an int8 checkpoint "
                             "(compressed-tensors W8A8) runs in int8 without it, on its own values")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                        help="auto: keys and values in the model's dtype; int8 (CPU): int8 with a float32 scale per "
                             "token and head, about half of bfloat16's bytes (twice the tokens in --kv-cache-memory, "
                             "half the cache a decode step reads)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="shard the model over N worker processes (torch.distributed: gloo on CPU, NCCL on CUDA; "
                             "not TPU yet). An engine without --worker starts them here, one per CUDA device or per "
                             "share of the CPU cores; a worker is rank $RANK of N, meeting the others at "
                             "$MASTER_ADDR:$MASTER_PORT (as torchrun sets them)")
    parser.add_argument("--collective-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="tensor parallelism: how long a rank waits for the others at a collective before the "
                             "group counts as broken (a dead or hung rank) and restarts")


def pem_file(text: str) -> str:
    """A PEM file that exists and can be read (its content is checked when it is loaded)."""
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"no readable file at {text!r}")
    return text


def add_server_tls_args(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group(
        "TLS", "Plaintext unless --tls-cert and --tls-key are given. The files are re-read when they change (or "
        "on SIGHUP): a rotated certificate is used for new connections, open streams carry on.")
    tls.add_argument("--tls-cert", type=pem_file, metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    tls.add_argument("--tls-key", type=pem_file, metavar="FILE", help="the private key of --tls-cert (PEM)")
    tls.add_argument("--tls-client-ca", type=pem_file, metavar="FILE",
                     help="mTLS: require client certificates signed by this CA (PEM); needs --tls-cert")


def add_client_tls_args(parser: argparse.ArgumentParser, prefix: str, peer: str) -> None:
    """--PREFIX-ca (TLS), with --PREFIX-cert and --PREFIX-key (mTLS), for the connection to `peer`."""
    tls = parser.add_argument_group(f"TLS to the {peer}", f"Plaintext unless --{prefix}-ca is given.")
    tls.add_argument(f"--{prefix}-ca", type=pem_file, metavar="FILE",
                     help=f"connect to the {peer} over TLS, verifying its certificate with this CA (PEM)")
    tls.add_argument(f"--{prefix}-cert", type=pem_file, metavar="FILE",
                     help=f"mTLS: present this client certificate chain (PEM) to the {peer}; needs --{prefix}-ca")
    tls.add_argument(f"--{prefix}-key", type=pem_file, metavar="FILE", help=f"the private key of --{prefix}-cert")


def server_tls_from(args):
    from tessera.serving import ServerTls

    return ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None


def client_tls_from(args, prefix: str):
    from tessera.serving import ClientTls

    dest = prefix.replace("-", "_")
    ca = getattr(args, f"{dest}_ca")
    return ClientTls(ca, getattr(args, f"{dest}_cert"), getattr(args, f"{dest}_key")) if ca else None


# (prefix of the client TLS flags, the subcommands that have them)
CLIENT_TLS = {"engine": "worker-tls", "tokenizer": "engine-tls", "health": "tls", "generate": "tls"}


def check_tls_args(parser: argparse.ArgumentParser, args) -> None:
    """Flag combinations that cannot work are a usage error, not a surprise at the first connection."""
    if hasattr(args, "tls_client_ca"):  # a server
        if bool(args.tls_cert) != bool(args.tls_key):
            parser.error("--tls-cert and --tls-key go together (the certificate and its private key)")
        if args.tls_client_ca and not args.tls_cert:
            parser.error("--tls-client-ca (mTLS) needs --tls-cert and --tls-key: client certificates are only "
                         "checked on a TLS port")
    prefix = CLIENT_TLS.get(args.command)
    if prefix is not None:
        dest = prefix.replace("-", "_")
        ca, cert, key = (getattr(args, f"{dest}_{part}") for part in ("ca", "cert", "key"))
        if bool(cert) != bool(key):
            parser.error(f"--{prefix}-cert and --{prefix}-key go together (the client certificate and its key)")
        if cert and not ca:
            parser.error(f"--{prefix}-cert (mTLS) needs --{prefix}-ca, the CA that signed the server's certificate")


def add_server_args(parser: argparse.ArgumentParser, port: int, max_request_bytes: str = "4MiB") -> None:
    parser.add_argument("--host", default="[::]", help="address to bind (default [::], every interface; "
                        "without TLS, a non-loopback address logs a warning)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="on SIGTERM, seconds in-flight calls get to finish while health says NOT_SERVING and "
                             "new calls get UNAVAILABLE (default 30; a second signal stops at once)")
    parser.add_argument("--max-request-bytes", type=parse_bytes, default=parse_bytes(max_request_bytes),
                        help=f"largest request message accepted; a bigger one is RESOURCE_EXHAUSTED from gRPC "
                             f"(default {max_request_bytes})")
    add_server_tls_args(parser)


def add_limit_args(parser: argparse.ArgumentParser, tokenizer: bool) -> None:
    """Per-request work limits (limits.Limits): a request over one is INVALID_ARGUMENT before any work."""
    from tessera.limits import Limits

    default = Limits()
    limit = parser.add_argument_group(
        "request limits", "A request over one is INVALID_ARGUMENT, before any work starts. A request_id (the field "
        "or x-request-id) is 1-128 printable ASCII characters without spaces on every server (not a flag).")
    limit.add_argument("--max-n", type=int, default=default.max_n,
                       help=f"samples per request, n (default {default.max_n})" +
                            ("" if tokenizer else "; never more than max-num-seqs + max-queue"))
    if tokenizer:
        limit.add_argument("--max-prompt-bytes", type=parse_bytes, default=default.max_prompt_bytes,
                           help="UTF-8 bytes of a prompt: the text, a chat's roles and contents, and the chat "
                                "rendered with its template (default 1MiB)")
        limit.add_argument("--max-stop-strings", type=int, default=default.max_stop_strings,
                           help=f"stopping.stop strings per request (default {default.max_stop_strings})")
        limit.add_argument("--max-stop-string-chars", type=int, default=default.max_stop_string_chars,
                           help=f"characters of each stop string (default {default.max_stop_string_chars})")
    limit.add_argument("--max-logit-bias", type=int, default=default.max_logit_bias,
                       help=f"sampling.logit_bias entries per request (default {default.max_logit_bias})")
    limit.add_argument("--max-stop-token-ids", type=int, default=default.max_stop_token_ids,
                       help=f"stopping.stop_token_ids per request (default {default.max_stop_token_ids})")


def limits_from(args):
    from dataclasses import fields

    from tessera.limits import Limits

    return Limits(**{f.name: getattr(args, f.name) for f in fields(Limits) if hasattr(args, f.name)})


def add_chat_template_args(parser: argparse.ArgumentParser) -> None:
    # Off by default, as vLLM's --trust-request-chat-template is: a template is code, and a server open to clients
    # it does not know should not run theirs. The model's own template (chosen by the operator) always renders.
    group = parser.add_argument_group(
        "chat templates from clients", "A request's chat_template is refused (INVALID_ARGUMENT) unless allowed; "
        "then it renders in a separate process, killed at its time or memory limit.")
    group.add_argument("--allow-client-chat-template", action="store_true",
                       help="render the chat_template that RenderChat and Generate requests may carry")
    group.add_argument("--chat-template-timeout", type=float, default=None, metavar="SECONDS",
                       help="wall-clock limit of one client template's render (default 1)")
    group.add_argument("--chat-template-memory", type=parse_bytes, default=None, metavar="SIZE",
                       help="address space of each render process (default 512MiB, at least 64MiB)")
    group.add_argument("--chat-template-processes", type=int, default=None, metavar="N",
                       help="render processes, i.e. client templates rendering at once; more wait (default 2)")


def chat_sandbox_from(args):
    """The sandbox's limits (chat_sandbox.SandboxLimits), or None when client templates are not allowed."""
    from tessera.tokenizer.chat_sandbox import SandboxLimits

    if not args.allow_client_chat_template:
        return None
    given = {"seconds": args.chat_template_timeout, "memory_bytes": args.chat_template_memory,
             "processes": args.chat_template_processes}
    try:
        return SandboxLimits(**{name: value for name, value in given.items() if value is not None})
    except ValueError as error:
        sys.exit(f"tessera tokenizer: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("TESSERA_LOG_LEVEL", "INFO"))
    roles = parser.add_subparsers(dest="command", required=True)

    engine = roles.add_parser("engine", help="the engine: scheduler, KV cache, and an in-process or remote worker")
    add_model_args(engine)
    add_server_args(engine, DEFAULT_PORT + 1)
    engine.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                        help="drive a remote worker instead of an in-process one")
    engine.add_argument("--worker-step-timeout", type=float, default=120.0,
                        help="seconds a remote worker may take for one step before it counts as down")
    add_client_tls_args(engine, "worker-tls", "remote worker")
    engine.add_argument("--max-num-seqs", type=int, default=128)
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--max-queue", type=int, default=256,
                        help="waiting requests before RESOURCE_EXHAUSTED (retry later); n above max-num-seqs + "
                             "max-queue can never fit: INVALID_ARGUMENT")
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs for decode steps")
    engine.add_argument("--structured-output-timeout", type=float, default=10.0,
                        help="seconds a structured-output constraint may take to compile (cached after) before the "
                             "request is refused with INVALID_ARGUMENT")
    add_limit_args(engine, tokenizer=False)

    worker = roles.add_parser("worker", help="a worker: model weights, KV tensors, sampler")
    add_model_args(worker)
    add_server_args(worker, DEFAULT_PORT + 2, max_request_bytes="64MiB")  # step plans of a whole batch

    tokenizer = roles.add_parser("tokenizer", help="the front door: text in, text out")
    tokenizer.add_argument("--model", default=DEFAULT_MODEL, help="directory with tokenizer.json")
    tokenizer.add_argument("--engine", action="append", default=[], metavar="HOST:PORT",
                           help="an engine to forward to (repeatable; the least loaded one is chosen)")
    add_server_args(tokenizer, DEFAULT_PORT)
    add_client_tls_args(tokenizer, "engine-tls", "engines")
    add_limit_args(tokenizer, tokenizer=True)
    add_chat_template_args(tokenizer)

    up = roles.add_parser("up", help="every role on this machine, as child processes")
    up.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (default: $TESSERA_MODEL or the "
                    "repository's demo model)")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help="the tokenizer's public port; the engine's is "
                    "the next one")
    up.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "tpu"], help="the engine's --device")
    up.add_argument("--host", default="127.0.0.1", help="the tokenizer's address to bind (default: %(default)s, this "
                    "machine only; the engine always binds 127.0.0.1)")

    health = roles.add_parser("health", help="exit 0 if a tessera server reports SERVING (for container probes)")
    health.add_argument("--address", default=f"localhost:{DEFAULT_PORT}", help="HOST:PORT (default: %(default)s)")
    health.add_argument("--service", default="", help="a service name; empty means the server as a whole")
    add_client_tls_args(health, "tls", "server")

    generate = roles.add_parser("generate", help="stream a completion from a running tessera")
    generate.add_argument("text", help="the prompt")
    generate.add_argument("--chat", action="store_true", help="send the text as a user message")
    generate.add_argument("--address", default=f"localhost:{DEFAULT_PORT}",
                          help="the tokenizer, HOST:PORT (default: %(default)s)")
    generate.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: %(default)s)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    generate.add_argument("--stop", action="append", default=[], metavar="STR",
                          help="stop at this string (repeatable)")
    generate.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                          help="how long to wait for the server to be ready, e.g. while `tessera up` starts "
                               "(default 60; 0: do not wait)")
    add_client_tls_args(generate, "tls", "tokenizer")

    quantize = roles.add_parser("quantize", help="write a float checkpoint as an int8 one (compressed-tensors W8A8), "
                                                 "which serves as --quantization int8 does, from half the bytes")
    quantize.add_argument("--model", required=True, help="the float checkpoint directory")
    quantize.add_argument("--output", required=True, help="a new or empty directory for the int8 checkpoint")
    return parser


# OpenMP threads (PyTorch's, the native kernels') spin this many times waiting for the next parallel region before
# they sleep, instead of libgomp's 300,000: long enough to bridge the gaps inside a decode step, short enough that
# between steps they leave the cores to the server's event loop and the clients (README, Served throughput).
OPENMP_SPIN_COUNT = "30000"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_tls_args(parser, args)
    if args.command in ("engine", "worker", "up"):  # before torch loads libgomp, which reads it once; set wins
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
    # A tensor-parallel rank says which it is on every line: N processes log to one terminal or collector.
    rank = f" rank {os.environ.get('RANK', '0')}" if getattr(args, "tensor_parallel_size", 1) > 1 else ""
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(name)s{rank} %(levelname)s %(message)s")
    return COMMANDS[args.command](args) or 0


def run_engine(args) -> None:
    from tessera.engine.engine import EngineConfig
    from tessera.engine.service import serve_engine

    if len(args.worker) > 1:
        sys.exit("tessera engine: one --worker (for tensor parallelism, rank 0 of the group)")
    if args.tensor_parallel_size < 1:
        sys.exit("tessera engine: --tensor-parallel-size must be at least 1")
    if args.tensor_parallel_size > 1 and (args.device or os.environ.get("TESSERA_DEVICE", "")) == "tpu":
        sys.exit("tessera engine: tensor parallelism runs on CUDA and CPU; the TPU backend is one device for now")
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
        cpu_matmul=args.cpu_matmul, structured_output_timeout=args.structured_output_timeout,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    asyncio.run(serve_engine(config, args.port, worker_address=(args.worker or [None])[0], host=args.host,
                             metrics_port=args.metrics_port, max_queue=args.max_queue, grace_seconds=args.grace,
                             worker_step_timeout=args.worker_step_timeout, limits=limits_from(args),
                             max_request_bytes=args.max_request_bytes, tls=server_tls_from(args),
                             worker_tls=client_tls_from(args, "worker-tls"), collective_timeout=args.collective_timeout))


def run_worker(args) -> None:
    from tessera.worker.device import resolve_device
    from tessera.worker.worker import WorkerConfig
    from tessera.worker.service import serve_worker

    if resolve_device(args.device).type == "xla":
        # The XLA runner compiles buckets sized by the engine's limits, which a separate worker does not know.
        sys.exit("tessera worker: TPU workers run inside the engine for now: use `tessera engine --device tpu`")
    config = WorkerConfig(args.model, args.dtype, args.device, args.block_size, args.kv_cache_memory,
                          cpu_matmul=args.cpu_matmul, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
                          collective_timeout=args.collective_timeout)
    if os.environ.get("TESSERA_CPUS"):  # a rank's share of the cores (engine/worker_group.py)
        os.sched_setaffinity(0, {int(core) for core in os.environ["TESSERA_CPUS"].split(",")})
    if args.tensor_parallel_size > 1 and int(os.environ.get("RANK", "0")) > 0:
        from tessera.worker.service import follow

        return follow(config)  # no server: rank 0 serves the engine and broadcasts each step here
    asyncio.run(serve_worker(config, args.port, host=args.host, metrics_port=args.metrics_port,
                             max_request_bytes=args.max_request_bytes, tls=server_tls_from(args)))


def run_tokenizer(args) -> None:
    from tessera.tokenizer.service import serve_tokenizer

    engines = args.engine or [f"localhost:{DEFAULT_PORT + 1}"]
    asyncio.run(serve_tokenizer(args.model, engines, args.port, host=args.host, metrics_port=args.metrics_port,
                                grace_seconds=args.grace, limits=limits_from(args),
                                max_request_bytes=args.max_request_bytes, tls=server_tls_from(args),
                                engine_tls=client_tls_from(args, "engine-tls"),
                                client_chat_templates=chat_sandbox_from(args)))


def run_up(args) -> int:
    """Engine and tokenizer as children; Ctrl-C or SIGTERM stops them both, cleanly."""
    engine_port = args.port + 1
    base = [sys.executable, "-m", "tessera.cli", "--log-level", args.log_level]
    children = [
        subprocess.Popen([*base, "engine", "--model", args.model, "--host", "127.0.0.1", "--port", str(engine_port),
                          *(["--device", args.device] if args.device else [])]),
        subprocess.Popen([*base, "tokenizer", "--model", args.model, "--engine", f"127.0.0.1:{engine_port}",
                          "--host", args.host, "--port", str(args.port)]),
    ]
    print(f"tessera up: tokenizer on localhost:{args.port}, engine on localhost:{engine_port} (Ctrl-C stops)",
          flush=True)

    def stop(*_):
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [child.wait() for child in children]
    return next((code for code in codes if code not in (0, -signal.SIGTERM)), 0)


def run_health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with client_channel(args, args.address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=5)
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def client_channel(args, address: str, options=None):
    """A sync channel for `tessera health`/`generate`: TLS with --tls-ca (mTLS with --tls-cert/--tls-key)."""
    import grpc

    tls = client_tls_from(args, "tls")
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


# A client waiting for a server that is starting retries its connection at least once a second.
WAIT_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                        ("grpc.max_reconnect_backoff_ms", 1000)]


def wait_until_serving(channel, address: str, service: str, seconds: float) -> str | None:
    """Polls the server's health for `service` until it is SERVING: None then, else after `seconds` why not.

    Says once on stderr that it waits. A server without the health service is taken as ready."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + seconds
    told = False
    while True:
        try:
            timeout = min(2.0, max(0.5, deadline - time.monotonic()))
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return None
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            why = f"it answers but reports {status}, as a tokenizer does until an engine is up"
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None  # no health service to ask: let Generate find out
            if error.code() == grpc.StatusCode.NOT_FOUND and service:
                service = ""  # not a tessera tokenizer: its overall status will do
                continue
            why = ("nothing answers there" if error.code() == grpc.StatusCode.UNAVAILABLE
                   else f"{error.code().name}: {error.details()}")
        if time.monotonic() >= deadline:
            return why
        if not told:
            print(f"tessera generate: {address} is not serving yet ({why}); waiting up to {seconds:g} s for it "
                  "to start (--wait)...", file=sys.stderr, flush=True)
            told = True
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def run_generate(args) -> int:
    import grpc

    from tessera.engine.v1 import engine_pb2
    from tessera.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    request = tokenizer_pb2.GenerateRequest(
        sampling=engine_pb2.SamplingParams(temperature=args.temperature),
        stopping=engine_pb2.StoppingParams(max_tokens=args.max_tokens, stop=args.stop),
    )
    if args.chat:
        request.messages.add(role="user", content=args.text)
    else:
        request.text = args.text
    with client_channel(args, args.address, WAIT_CHANNEL_OPTIONS) as channel:
        try:
            service = tokenizer_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
            why = wait_until_serving(channel, args.address, service, args.wait) if args.wait > 0 else None
        except KeyboardInterrupt:
            return 130
        if why is not None:
            print(f"tessera generate: {args.address} did not become ready in {args.wait:g} s ({why}).\n"
                  "Is `tessera up` (or `make up`) running, with its tokenizer on that port? Its log says what it "
                  "is doing. --address picks another server, --wait waits longer.", file=sys.stderr)
            return 1
        if not args.chat:
            print(args.text, end="", flush=True)
        try:
            for response in tokenizer_pb2_grpc.TextGenerationStub(channel).Generate(request):
                print(response.text, end="", flush=True)
        except grpc.RpcError as error:
            print(f"\ntessera generate: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print()
    return 0


def run_quantize(args) -> int:
    from tessera.model_config import CheckpointError
    from tessera.worker.int8_writer import write_int8_checkpoint

    try:
        count = write_int8_checkpoint(args.model, args.output)
    except (CheckpointError, ValueError) as error:
        print(f"tessera quantize: {error}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in Path(args.output).glob("*.safetensors"))
    print(f"{args.output}: {count} projections in int8, {size / 2**20:.1f} MiB of weights")
    return 0


COMMANDS = {"engine": run_engine, "worker": run_worker, "tokenizer": run_tokenizer, "up": run_up,
            "health": run_health, "generate": run_generate, "quantize": run_quantize}

if __name__ == "__main__":
    sys.exit(main())
