"""TLS cost: the served workload (text via `tessera tokenizer` -> `tessera engine`) in plaintext and with mTLS
on both hops, side by side in one run.

    python bench/tls_cost.py                                   # 64 requests, prompts 32-512, outputs 16-256, 2 rounds
    python bench/tls_cost.py --rounds 4                        # a loaded machine: more alternations
    python bench/tls_cost.py --scale 0.1 --requests 8 --latency-requests 4 --rounds 1   # a smoke run

Two chains run at once on 127.0.0.1, same model and config: a plaintext tokenizer -> engine, and one where
client -> tokenizer and tokenizer -> engine are both mTLS (--tls-cert/--tls-key/--tls-client-ca on each server,
--engine-tls-ca/-cert/-key on the tokenizer; the client presents a client certificate). The certificates are
throwaway (a CA, a server certificate for localhost and 127.0.0.1, a client certificate: EC P-256), made at start
into a temporary directory with `cryptography` (the test extra). The workload, the client and the measurements
are bench/served_throughput.py's --via-tokenizer ones: concurrent TextGeneration/Generate streams over grpc.aio
(throughput), then Poisson arrivals at a fixed rate (time to first token, inter-token latency). Channels and
engines are warmed up first (a first call, then 8 of the workload's streams, untimed), so the TLS handshakes are
not in the numbers: this is the steady-state cost of encrypting both hops. Each round runs both chains, the order flipping every round (plaintext, TLS; TLS, plaintext; ...) so drift
hits both alike; throughput is the best of the rounds, latency percentiles are over all rounds' samples.
Goals (the TLS issue): <= 5 % throughput cost, <= 2 ms added TTFT at p50.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import grpc
import numpy as np
import torch

from bench_model import build_bench_model, cpu_model, make_workload
from served_throughput import DEMO_TOKENIZER, Client, ServerProcess, ms, run_at_rate, run_served, scaled, text_prompts

MODES = ("plaintext", "mTLS")
GOAL_THROUGHPUT_COST = 0.05  # at most 5 % fewer tok/s with TLS
GOAL_TTFT_ADDED_S = 2e-3  # at most 2 ms more time to first token at p50


def make_certificates(root: Path) -> dict[str, str]:
    """A throwaway CA, a server certificate (localhost, 127.0.0.1) and a client certificate, as PEM files."""
    from tls_certificates import Ca  # needs `cryptography` (the test extra); tests/ is on sys.path

    ca = Ca("tessera bench CA")
    files = {"ca": ca.pem()}
    files["server"], files["server-key"], _ = ca.issue("server", ("localhost",), ("127.0.0.1",))
    files["client"], files["client-key"], _ = ca.issue("client", client=True)
    paths = {}
    for name, data in files.items():
        paths[name] = str(root / f"{name}.pem")
        (root / f"{name}.pem").write_bytes(data)
    return paths


def start_chain(model_dir: Path, kv_cache_memory: int, certs: dict[str, str] | None) -> list[ServerProcess]:
    """engine, then tokenizer in front of it; with certs, mTLS on both hops. The caller stops them."""
    server_tls, engine_tls, credentials = [], [], None
    if certs is not None:
        server_tls = ["--tls-cert", certs["server"], "--tls-key", certs["server-key"], "--tls-client-ca", certs["ca"]]
        engine_tls = ["--engine-tls-ca", certs["ca"], "--engine-tls-cert", certs["client"],
                      "--engine-tls-key", certs["client-key"]]
        credentials = client_credentials(certs)
    servers = []
    try:
        servers.append(ServerProcess("engine", "--model", str(model_dir), "--kv-cache-memory", str(kv_cache_memory),
                                     *server_tls, credentials=credentials).start())
        servers.append(ServerProcess("tokenizer", "--model", str(DEMO_TOKENIZER), "--engine", servers[0].address,
                                     *engine_tls, *server_tls, credentials=credentials).start())
    except BaseException:
        stop(servers)
        raise
    return servers


def stop(servers: list[ServerProcess]) -> None:
    for server in reversed(servers):
        server.stop()


def client_credentials(certs: dict[str, str]) -> grpc.ChannelCredentials:
    read = lambda name: Path(certs[name]).read_bytes()  # noqa: E731
    return grpc.ssl_channel_credentials(read("ca"), read("client-key"), read("client"))


async def measure(args, clients: dict[str, Client], prompts, output_lens, lat_prompts, lat_lens):
    """--rounds rounds, each: throughput in both modes, then latency in both, the order flipping every round."""
    times = {mode: [] for mode in MODES}
    ttfts = {mode: [] for mode in MODES}
    gaps = {mode: [] for mode in MODES}
    lat_rate = {mode: [] for mode in MODES}
    tokens = {}
    for client in clients.values():  # warm-up, untimed: connect (the TLS handshakes), then a few streams at once
        await client.generate(prompts[0][:8], 2)
        await run_served(client, prompts[:8], output_lens[:8])
    for round_ in range(args.rounds):
        order = MODES if round_ % 2 == 0 else MODES[::-1]
        for mode in order:
            seconds, tokens[mode] = await run_served(clients[mode], prompts, output_lens)
            times[mode].append(seconds)
        for mode in order:
            round_ttfts, round_gaps, lat_tokens, wall = await run_at_rate(clients[mode], lat_prompts, lat_lens,
                                                                          args.rate, args.seed)
            ttfts[mode] += round_ttfts
            gaps[mode] += round_gaps
            lat_rate[mode].append(lat_tokens / wall)
        latest = {mode: np.median(ttfts[mode][-len(lat_prompts):]) * 1e3 for mode in MODES}
        print(f"round {round_ + 1}/{args.rounds} ({', '.join(order)}): "
              + ", ".join(f"{mode} {times[mode][-1]:.1f} s, TTFT p50 {latest[mode]:.1f} ms" for mode in MODES),
              flush=True)
    return times, tokens, ttfts, gaps, lat_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests in the throughput workload")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies prompt and output lengths (quick runs)")
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s for the latency run (Poisson)")
    parser.add_argument("--latency-requests", type=int, default=32, help="requests in each latency run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--model-dir", default="bench/out/bench-llama")
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes, for both engines")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both modes, the order flipping each round; the best throughput counts")
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline of each gRPC call, seconds")
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = build_bench_model(args.model_dir)
    prompt_range, output_range = scaled(32, 512, args.scale), scaled(16, 256, args.scale)
    workload = make_workload(args.requests, prompt_range, output_range)
    latency_workload = make_workload(args.latency_requests, prompt_range, output_range, seed=1)
    prompts, engine_prompts = text_prompts(workload.prompts)
    lat_prompts, _ = text_prompts(latency_workload.prompts)
    total = sum(workload.output_lens)
    print(f"machine: {cpu_model()}; torch {torch.__version__}")
    print(f"workload: {args.requests} requests, prompts {prompt_range[0]}-{prompt_range[1]} "
          f"({sum(map(len, engine_prompts))} prompt tokens), outputs {output_range[0]}-{output_range[1]} "
          f"({total} output tokens), greedy, EOS ignored, fp32; served: text via tokenizer -> engine, "
          f"plaintext vs mTLS on both hops (EC P-256 certificates)", flush=True)

    with tempfile.TemporaryDirectory(prefix="tessera-tls-bench-") as tmp:
        certs = make_certificates(Path(tmp))
        chains = {}
        try:
            chains["plaintext"] = start_chain(model_dir, args.kv_cache_memory, None)
            chains["mTLS"] = start_chain(model_dir, args.kv_cache_memory, certs)
            credentials = {"plaintext": None, "mTLS": client_credentials(certs)}

            async def run():
                clients = {mode: Client(chains[mode][-1].address, True, args.timeout, credentials[mode])
                           for mode in MODES}
                try:
                    return await measure(args, clients, prompts, workload.output_lens, lat_prompts,
                                         latency_workload.output_lens)
                finally:
                    for client in clients.values():
                        await client.close()

            times, tokens, ttfts, gaps, lat_rate = asyncio.run(run())
        finally:
            for servers in chains.values():
                stop(servers)

    assert all(sum(map(len, tokens[mode])) == total for mode in MODES)
    same = sum(a == b for a, b in zip(tokens["plaintext"], tokens["mTLS"]))
    best = {mode: min(times[mode]) for mode in MODES}
    tok_s = {mode: total / best[mode] for mode in MODES}
    p50 = {mode: {"ttft": np.median(ttfts[mode]), "itl": np.median(gaps[mode])} for mode in MODES}
    p99 = {mode: {"ttft": np.percentile(ttfts[mode], 99), "itl": np.percentile(gaps[mode], 99)} for mode in MODES}

    print()
    rounds = f"best of {args.rounds} rounds" if args.rounds > 1 else "1 round"
    print(f"{f'throughput ({args.requests} streams, {rounds})':<42}{'tok/s':>10}{'seconds':>10}")
    for mode in MODES:
        print(f"{mode:<42}{tok_s[mode]:10.1f}{best[mode]:10.1f}")
    print(f"same tokens, plaintext and mTLS: {same}/{args.requests} requests")
    print()
    samples = f"{args.latency_requests} requests x {args.rounds} round{'s' if args.rounds > 1 else ''}"
    print(f"latency: Poisson {args.rate:g} req/s (seed {args.seed}), {samples} per mode; "
          + ", ".join(f"{mode} {np.mean(lat_rate[mode]):.1f} tok/s" for mode in MODES))
    print(f"{'':<42}{'p50':>11}{'p99':>11}")
    for name, key in (("time to first token", "ttft"), ("inter-token latency", "itl")):
        for mode in MODES:
            print(f"{f'{name}, {mode}':<42}{ms(p50[mode][key]):>11}{ms(p99[mode][key]):>11}")
    print()
    ratio = tok_s["mTLS"] / tok_s["plaintext"]
    cost = 1 - ratio
    ttft_added = p50["mTLS"]["ttft"] - p50["plaintext"]["ttft"]
    itl_added = p50["mTLS"]["itl"] - p50["plaintext"]["itl"]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"mTLS / plaintext throughput: {ratio:.3f}x, cost {cost * 100:+.1f} % "
          f"(goal <= {GOAL_THROUGHPUT_COST * 100:g} %: {verdict(cost <= GOAL_THROUGHPUT_COST)})")
    print(f"TTFT p50 added by mTLS: {ttft_added * 1e3:+.2f} ms "
          f"(goal <= {GOAL_TTFT_ADDED_S * 1e3:g} ms: {verdict(ttft_added <= GOAL_TTFT_ADDED_S)})")
    print(f"ITL p50 added by mTLS: {itl_added * 1e3:+.2f} ms")


if __name__ == "__main__":
    main()
