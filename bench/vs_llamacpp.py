"""tessera vs llama.cpp's llama-server on the CPU: the benchmark model served by both, side by side in one run.

    python bench/vs_llamacpp.py [--rounds 2] [--precisions float32,bfloat16,int8] [--streams 48]
                                [--single-tokens 128] [--prefill 512] [--quick]
    python bench/vs_llamacpp.py --build-only        # only build llama-server and convert the model

llama.cpp comes from the llama-cpp-python sdist on PyPI (LLAMACPP_PYTHON_VERSION below: its vendor/llama.cpp has
the CMake build, convert_hf_to_gguf.py and gguf-py). The first run downloads it with pip and builds only the
llama-server target (Release, CPU only, GGML_NATIVE=ON, no HTTPS, no web UI, -j = cores) into
$TESSERA_LLAMACPP_CACHE/<version> (default ~/.cache/tessera/llama.cpp/<version>); later runs reuse it. It needs
g++ and cmake (pip's `cmake` and `ninja` are installed into this venv when the system has no cmake). The
benchmark model (bench/out/bench-llama) is converted with llama.cpp's own converter to GGUF at f32, bf16 and
q8_0, cached next to the model (bench/out/bench-llama-gguf/).

Both servers get the same requests as token ids: tessera's Engine/Generate over gRPC (`tessera engine`, --dtype
float32|bfloat16, --quantization int8 for the int8 row), llama-server's /completion with "prompt": [ids]. Only one
server runs at a time, each with the same number of threads, and every round starts them in the other order so that
drift on a shared machine hits both alike; best of the rounds counts. Workloads, greedy with EOS ignored: --streams
concurrent streams (prompts 128-256 random ids, 128 output tokens, fixed seed; both servers stream every token,
llama-server as server-sent events) -> total generated tok/s, and llama-server's figure for the same requests
answered whole (no streaming) beside it; one stream (32-token prompt, --single-tokens output) -> tok/s and ms/token;
one prefill of --prefill tokens -> tok/s. llama-server runs with -t/-tb = --threads (tessera: OMP_NUM_THREADS),
--parallel --llamacpp-slots -cb for the many streams and --parallel 1 for the rest, a KV cache in tessera's dtype
(f32, bf16; q8_0 when tessera runs --kv-cache-dtype int8; --llamacpp-kv f16 gives it its own default), no prompt
cache; tessera with --no-prefix-caching, since rounds repeat the prompts. A model llama-server dies on at start
with its weights repacked (its AMX-INT8 Q8_0 buffer, on some Xeons) is rerun with --no-repack, and the report says
so. Every response's tokens are counted, and the greedy tokens of both servers are compared (the share of
identical leading tokens: at fp32, a check of the conversion, not of speed).
Goals (issue #13): one stream >= 1.0x llama.cpp, many streams >= 3x.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench_model import build_bench_model, cpu_model
from served_throughput import Client, ServerProcess, run_served  # also puts tests/ on sys.path
from servers import free_port, wait_serving

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP_PYTHON_VERSION = "0.3.36"  # its CHANGELOG: llama.cpp at ggml-org/llama.cpp@0c1e57098


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_dir() -> Path:
    base = os.environ.get("TESSERA_LLAMACPP_CACHE") or Path.home() / ".cache" / "tessera" / "llama.cpp"
    return Path(base) / LLAMACPP_PYTHON_VERSION


def llamacpp_source() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist, downloaded and unpacked once."""
    root = cache_dir()
    source = root / f"llama_cpp_python-{LLAMACPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"llama_cpp_python-{LLAMACPP_PYTHON_VERSION}.tar.gz"
    if not archive.exists():
        print(f"downloading the llama-cpp-python {LLAMACPP_PYTHON_VERSION} sdist (~75 MB)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMACPP_PYTHON_VERSION}",
                        "--no-binary", ":all:", "--no-deps", "-d", str(root)], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return source


def build_tools() -> tuple[str, str | None]:
    """(cmake, ninja or None): the system's, else pip's wheels installed into this venv."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        sys.exit("building llama.cpp needs a C++ compiler: install g++ (Debian/Ubuntu: apt-get install g++)")
    venv_bin = Path(sys.executable).parent
    find = lambda name: shutil.which(name) or shutil.which(name, path=str(venv_bin))  # noqa: E731
    if find("cmake") is None:
        print("no cmake on this machine: installing pip's cmake and ninja into this venv", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "cmake", "ninja"], check=True)
    return find("cmake"), find("ninja")


def llama_server() -> Path:
    """The llama-server binary, built once per machine (206 compile steps: ~30 minutes on 2 busy cores)."""
    build = cache_dir() / "build"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    source = llamacpp_source()
    cmake, ninja = build_tools()
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    print(f"building llama-server ({cores()} jobs) in {build}", flush=True)
    start = time.perf_counter()
    subprocess.run([cmake, "-S", str(source), "-B", str(build), *generator,
                    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                    # CPU only; no HTTPS (LLAMA_CURL is gone in this version: OpenSSL is what it would use),
                    # no web UI (it would download a prebuilt one), nothing but the server.
                    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
                    "-DGGML_CCACHE=OFF"], check=True)
    subprocess.run([cmake, "--build", str(build), "--target", "llama-server", "-j", str(cores())], check=True)
    print(f"built llama-server in {time.perf_counter() - start:.0f} s", flush=True)
    return binary


# The converter's imports (requirements/requirements-convert_hf_to_gguf.txt, less what only other models use).
CONVERTER_NEEDS = {"numpy": "numpy", "torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
                   "sentencepiece": "sentencepiece>=0.1.98,<0.3.0", "yaml": "pyyaml", "tqdm": "tqdm"}

# Runs convert_hf_to_gguf.py with its own gguf-py. The converter names a BPE vocabulary's pre-tokenizer by hashing
# how it splits a test string, and refuses vocabularies it has no hash for, as ours (trained here) is; its
# pre-tokenizer is GPT-2's byte-level regex, so that is the name to give. Prompts go in as token ids either way.
CONVERT = """
import runpy, sys
source = sys.argv[1]
sys.path[:0] = [source, source + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [source + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def gguf_models(model_dir: Path, outtypes) -> dict[str, Path]:
    """outtype -> the model converted by llama.cpp's converter, next to the model; redone when the model changes."""
    import importlib.util

    from bench_model import build_bench_tokenizer

    build_bench_tokenizer(model_dir)  # the converter wants a vocabulary (the bench model's own)
    out = model_dir.parent / f"{model_dir.name}-gguf"
    paths = {t: out / f"{model_dir.name}-{t}.gguf" for t in outtypes}
    stale = [t for t, path in paths.items()
             if not path.exists() or path.stat().st_mtime < (model_dir / "model.safetensors").stat().st_mtime]
    if not stale:
        return paths
    missing = [spec for module, spec in CONVERTER_NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing the converter's requirements into this venv: {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)
    out.mkdir(parents=True, exist_ok=True)
    for outtype in stale:
        print(f"converting {model_dir} to GGUF {outtype}", flush=True)
        partial = paths[outtype].with_suffix(".partial")
        # cwd outside the clone: `python -c` puts it first on sys.path, where this repository's kernels/ is also
        # a top-level `kernels` (kernels/__init__.py hands that import on to the package transformers wants).
        result = subprocess.run([sys.executable, "-c", CONVERT, str(llamacpp_source()), str(model_dir.resolve()),
                                 "--outtype", outtype, "--outfile", str(partial.resolve())],
                                capture_output=True, text=True, check=False, cwd=out)
        if result.returncode != 0:
            sys.exit(f"convert_hf_to_gguf.py failed ({outtype}):\n{result.stderr[-4000:]}")
        partial.rename(paths[outtype])  # only a complete file counts as cached
    return paths


@dataclass
class Sizes:
    streams: int = 48
    prompt_range: tuple[int, int] = (128, 256)
    stream_tokens: int = 128
    single_prompt: int = 32
    single_tokens: int = 128
    prefill: int = 512
    repeats: int = 2  # one stream and prefill: best of this many per round
    slots: int = 16  # llama-server slots for the many-streams case


@dataclass
class Precision:
    tessera: list[str]  # `tessera engine` options
    gguf: str  # converter --outtype
    kv: str  # llama-server's KV cache type that matches tessera's (it keeps K and V in the activations' dtype)


PRECISIONS = {"float32": Precision(["--dtype", "float32"], "f32", "f32"),
              "bfloat16": Precision(["--dtype", "bfloat16"], "bf16", "bf16"),
              "int8": Precision(["--dtype", "float32", "--quantization", "int8"], "q8_0", "f32")}


@dataclass
class Run:
    """What one server did in one round: seconds of each workload, and the tokens it generated."""
    streams_s: float = 0.0
    stream_tokens: list[list[int]] = field(default_factory=list)
    single_s: float = float("inf")
    single_ms_per_token: float = float("inf")
    single_tokens: list[int] = field(default_factory=list)
    single_client_ms_per_token: float = float("inf")  # this process's CPU (the client's) per token of one stream
    prefill_s: float = float("inf")
    whole_s: float = float("inf")  # llama-server only: the many streams' requests answered whole, unstreamed


def process_cpu() -> float:
    """CPU seconds of this process so far, all threads: what the clients cost, on the servers' cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def workload(sizes: Sizes):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randint(*sizes.prompt_range))] for _ in range(sizes.streams)]
    single = [rng.randrange(3, 32000) for _ in range(sizes.single_prompt)]
    prefill = [rng.randrange(3, 32000) for _ in range(sizes.prefill)]
    return prompts, single, prefill


def check_count(who: str, tokens: list[int], wanted: int) -> None:
    if len(tokens) < wanted:
        raise RuntimeError(f"{who} generated {len(tokens)} tokens where {wanted} were asked for")


# tessera: `tessera engine` over gRPC, token ids to Engine/Generate.

class Engine(ServerProcess):
    def start(self) -> "Engine":
        # A loaded machine can take longer than the tests' 60 s to load the model and warm up.
        self.process = subprocess.Popen(self.command, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        wait_serving(self.address, timeout=600, process=self.process)
        return self


async def tessera_session(address: str, sizes: Sizes, prompts, single, prefill, timeout: float) -> Run:
    client = Client(address, via_tokenizer=False, timeout=timeout)
    run = Run()
    try:
        # Warm-up, untimed and the same for both servers: every prompt with a few tokens, then one stream.
        await run_served(client, prompts, [4] * len(prompts))
        await client.generate(single, 4)
        run.streams_s, run.stream_tokens = await run_served(client, prompts, [sizes.stream_tokens] * len(prompts))
        for tokens in run.stream_tokens:
            check_count("tessera", tokens, sizes.stream_tokens)
        for _ in range(sizes.repeats):
            sent, cpu = time.perf_counter(), process_cpu()
            tokens, arrivals = await client.generate(single, sizes.single_tokens)
            check_count("tessera", tokens, sizes.single_tokens)
            run.single_client_ms_per_token = min(run.single_client_ms_per_token,
                                                 (process_cpu() - cpu) / len(tokens) * 1e3)
            if arrivals[-1] - sent < run.single_s:
                run.single_s, run.single_tokens = arrivals[-1] - sent, tokens
                run.single_ms_per_token = (arrivals[-1] - arrivals[0]) / (len(tokens) - 1) * 1e3
        if prefill:
            for _ in range(sizes.repeats):
                sent = time.perf_counter()
                check_count("tessera", (await client.generate(prefill, 1))[0], 1)
                run.prefill_s = min(run.prefill_s, time.perf_counter() - sent)
    finally:
        await client.close()
    return run


def run_tessera(model_dir: Path, precision: Precision, kv_cache_dtype: str, threads: int, sizes: Sizes, prompts,
                single, prefill, timeout: float) -> Run:
    # Rounds repeat the same prompts: without --no-prefix-caching later rounds would skip their prefill, which
    # llama-server (cache_prompt false) does not.
    args = ["--model", str(model_dir), *precision.tessera, "--kv-cache-dtype", kv_cache_dtype,
            "--kv-cache-memory", "1GiB", "--no-prefix-caching"]
    with Engine("engine", *args, env={"OMP_NUM_THREADS": str(threads)}) as engine:
        return asyncio.run(tessera_session(engine.address, sizes, prompts, single, prefill, timeout))


# llama.cpp: llama-server, token ids to /completion over HTTP.

class LlamaServer:
    """llama-server on 127.0.0.1 with `slots` slots of `slot_context` tokens each; its log goes to `log`."""

    def __init__(self, binary: Path, model: Path, slots: int, slot_context: int, threads: int, kv: str, log: Path):
        self.port = free_port()
        self.command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                        "-t", str(threads), "-tb", str(threads), "--parallel", str(slots), "-cb",
                        "-c", str(slots * slot_context), "-ctk", kv, "-ctv", kv,
                        "--cache-ram", "0",  # no host-side prompt cache either: every prompt is prefilled
                        "--no-webui"]
        self.model, self.log = model, log

    # The models llama-server crashed on at start with their weights repacked (the AMX-INT8 buffer of Q8_0
    # segfaults in its warm-up on some Xeons, llama.cpp #20824); they then run with --no-repack, its plain kernels.
    no_repack: set[Path] = set()

    def __enter__(self) -> "LlamaServer":
        command = self.command + (["--no-repack"] if self.model in LlamaServer.no_repack else [])
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # /health answers 503 while the model loads, 200 once it serves
            if self.process.poll() is not None:
                if self.process.returncode < 0 and self.model not in LlamaServer.no_repack:
                    print(f"llama-server died of signal {-self.process.returncode} at start with its weights "
                          f"repacked (AMX / CPU_REPACK buffers); {self.model.name} runs with --no-repack from here on",
                          flush=True)
                    LlamaServer.no_repack.add(self.model)
                    return self.__enter__()
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError(f"llama-server did not come up in 300 s; see {self.log}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def complete(self, prompt: list[int], n: int, stream: bool = False) -> tuple[list[int], list[float]]:
        """Greedy, EOS ignored: the generated token ids and the arrival time of each chunk that carried some."""
        body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "cache_prompt": False,
                           "ignore_eos": True, "stream": stream, "return_tokens": True})
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        try:
            connection.request("POST", "/completion", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"llama-server answered {response.status}: {response.read()[:500]!r}")
            if not stream:
                result = json.loads(response.read())
                self.check_prefilled(result, prompt)
                return result["tokens"], [time.perf_counter()]
            tokens, arrivals = [], []
            for line in response:  # server-sent events: "data: {json}" lines
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("tokens"):
                    arrivals.append(time.perf_counter())
                    tokens.extend(chunk["tokens"])
                if chunk.get("stop"):
                    self.check_prefilled(chunk, prompt)
                    # A last token that ends inside a UTF-8 sequence is never sent (its text waits for more
                    # bytes): count it from the final chunk, as -1 (it only ends the agreement count).
                    tokens.extend([-1] * max(0, chunk.get("tokens_predicted", 0) - len(tokens)))
                    break
            return tokens, arrivals
        finally:
            connection.close()

    @staticmethod
    def check_prefilled(result: dict, prompt: list[int]) -> None:
        """A slot may still hold an earlier request's tokens: cache_prompt false must not reuse them."""
        timings = result.get("timings", {})
        if timings.get("cache_n", 0) != 0 or timings.get("prompt_n", len(prompt)) != len(prompt):
            raise RuntimeError(f"llama-server did not prefill the whole prompt: {timings}")

    def many(self, prompts, n: int, stream: bool = True) -> tuple[float, list[list[int]]]:
        with ThreadPoolExecutor(len(prompts)) as pool:  # one blocking HTTP request per thread, all at once
            start = time.perf_counter()
            results = list(pool.map(lambda prompt: self.complete(prompt, n, stream)[0], prompts))
            return time.perf_counter() - start, results


def run_llamacpp(binary: Path, model: Path, threads: int, sizes: Sizes, prompts, single,
                 prefill, kv: str, log: Path) -> Run:
    run = Run()
    # Many streams: `slots` slots batched together (continuous batching); a slot holds one request's context.
    slot_context = sizes.prompt_range[1] + sizes.stream_tokens + 16
    with LlamaServer(binary, model, sizes.slots, slot_context, threads, kv, log) as server:
        server.many(prompts, 4)  # warm-up, as tessera's
        run.streams_s, run.stream_tokens = server.many(prompts, sizes.stream_tokens)
        for tokens in run.stream_tokens:
            check_count("llama-server", tokens, sizes.stream_tokens)
        # The same requests answered whole: what streaming costs llama-server (tessera's Generate always streams).
        run.whole_s, whole = server.many(prompts, sizes.stream_tokens, stream=False)
        for tokens in whole:
            check_count("llama-server", tokens, sizes.stream_tokens)
    # One stream and prefill: one slot, as a single user would run it.
    with LlamaServer(binary, model, 1, max(sizes.single_prompt + sizes.single_tokens, sizes.prefill + 1) + 16,
                     threads, kv, log) as server:
        server.complete(single, 4)
        for _ in range(sizes.repeats):
            sent, cpu = time.perf_counter(), process_cpu()
            tokens, arrivals = server.complete(single, sizes.single_tokens, stream=True)
            check_count("llama-server", tokens, sizes.single_tokens)
            run.single_client_ms_per_token = min(run.single_client_ms_per_token,
                                                 (process_cpu() - cpu) / len(tokens) * 1e3)
            if arrivals[-1] - sent < run.single_s:
                run.single_s, run.single_tokens = arrivals[-1] - sent, tokens
                run.single_ms_per_token = (arrivals[-1] - arrivals[0]) / (len(tokens) - 1) * 1e3
        if prefill:
            for _ in range(sizes.repeats):
                sent = time.perf_counter()
                check_count("llama-server", server.complete(prefill, 1)[0], 1)
                run.prefill_s = min(run.prefill_s, time.perf_counter() - sent)
    return run


def kv_type(precision: Precision, option: str, kv_cache_dtype: str) -> str:
    """llama-server's -ctk/-ctv: tessera's own (its int8 cache: q8_0, int8 with a scale per 32 values) for match."""
    if option != "match":
        return option
    return "q8_0" if kv_cache_dtype == "int8" else precision.kv


# The report.

def leading_agreement(a: list[list[int]], b: list[list[int]], n: int) -> float:
    """The share of tokens before each pair of completions first differs (greedy: after that they diverge)."""
    same = 0
    for x, y in zip(a, b):
        common = next((i for i, (s, t) in enumerate(zip(x[:n], y[:n])) if s != t), min(len(x), len(y), n))
        same += common
    return same / (n * len(a))


def llamacpp_version(binary: Path) -> str:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("version")]
    return lines[0].removeprefix("version: ") if lines else "unknown"


def report(name: str, precision: Precision, tessera_kv: str, kv: str, sizes: Sizes,
           runs: dict[str, list[Run]]) -> None:
    ts, lc = runs["tessera"], runs["llama.cpp"]
    best = lambda rs, key: min(getattr(r, key) for r in rs)  # noqa: E731  (seconds: the best round)
    rows = [(f"{sizes.streams} streams, total tok/s", sizes.streams * sizes.stream_tokens / best(ts, "streams_s"),
             sizes.streams * sizes.stream_tokens / best(lc, "streams_s"), 3.0),
            ("one stream, tok/s", sizes.single_tokens / best(ts, "single_s"),
             sizes.single_tokens / best(lc, "single_s"), 1.0),
            ("one stream, ms/token (decode)", best(ts, "single_ms_per_token"), best(lc, "single_ms_per_token"), None),
            ("one stream, client CPU ms/token", best(ts, "single_client_ms_per_token"),
             best(lc, "single_client_ms_per_token"), None)]
    if sizes.prefill:
        rows.append((f"prefill {sizes.prefill} tokens, tok/s", sizes.prefill / best(ts, "prefill_s"),
                     sizes.prefill / best(lc, "prefill_s"), None))
    print(f"\n{name}: tessera {' '.join(precision.tessera)} --kv-cache-dtype {tessera_kv}; llama.cpp {precision.gguf} "
          f"GGUF, KV cache {kv}" + (", --no-repack" if any(precision.gguf in m.name for m in LlamaServer.no_repack)
                                    else ""))
    print(f"{'':<34}{'tessera':>10}{'llama.cpp':>11}{'ratio':>8}   goal")
    for label, ours, theirs, goal in rows:
        if "CPU" in label:  # the clients' cost (gRPC's vs HTTP's), no ratio of the servers
            print(f"{label:<34}{ours:10.2f}{theirs:11.2f}")
            continue
        ratio = theirs / ours if "ms/token" in label else ours / theirs  # > 1: tessera is faster
        verdict = f">= {goal:g}x: {'met' if ratio >= goal else 'NOT met'}" if goal else ""
        print(f"{label:<34}{ours:10.1f}{theirs:11.1f}{ratio:7.2f}x   {verdict}")
    whole = sizes.streams * sizes.stream_tokens / best(lc, "whole_s")
    print(f"{'  llama.cpp unstreamed (whole)':<34}{'':>10}{whole:11.1f}{rows[0][1] / whole:7.2f}x")
    streams = leading_agreement(ts[-1].stream_tokens, lc[-1].stream_tokens, sizes.stream_tokens)
    single = leading_agreement([ts[-1].single_tokens], [lc[-1].single_tokens], sizes.single_tokens)
    counted = {side: sum(map(len, rs[-1].stream_tokens)) for side, rs in runs.items()}
    print(f"tokens counted ({sizes.streams} streams, last round): " + ", ".join(
        f"{side} {n}" for side, n in counted.items()) + f" of {sizes.streams * sizes.stream_tokens} asked for")
    print(f"greedy tokens identical before the first difference: {streams * 100:.1f} % over the {sizes.streams} "
          f"streams, {single * 100:.1f} % of the one stream" + (" (the conversion check)" if name == "float32" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each server first in every other one")
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--streams", type=int, default=48, help="concurrent streams in the throughput case")
    parser.add_argument("--single-tokens", type=int, default=128, help="output tokens of the one stream")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill case (0: skip it)")
    parser.add_argument("--llamacpp-slots", type=int, default=16, help="llama-server --parallel for many streams")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                        help="tessera's --kv-cache-dtype (auto: the activations' dtype)")
    parser.add_argument("--llamacpp-kv", default="match",
                        help="llama-server's KV cache type: match (tessera's: f32, bf16; q8_0 for an int8 cache) or a "
                             "type such as f16")
    parser.add_argument("--threads", type=int, default=cores(), help="threads of each server (default: cores)")
    parser.add_argument("--model-dir", default=str(ROOT / "bench" / "out" / "bench-llama"))
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline of each gRPC call, seconds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--build-only", action="store_true", help="build llama-server, convert the model, stop")
    args = parser.parse_args()
    names = args.precisions.split(",")
    if unknown := set(names) - set(PRECISIONS):
        parser.error(f"unknown precisions {sorted(unknown)}: choose from {', '.join(PRECISIONS)}")
    sizes = Sizes(streams=args.streams, single_tokens=args.single_tokens, prefill=args.prefill,
                  slots=min(args.llamacpp_slots, args.streams))
    if args.quick:
        sizes = Sizes(streams=4, prompt_range=(16, 32), stream_tokens=8, single_prompt=8, single_tokens=8,
                      prefill=min(args.prefill, 64), repeats=1, slots=4)

    binary = llama_server()
    model_dir = build_bench_model(args.model_dir)
    ggufs = gguf_models(model_dir, [PRECISIONS[name].gguf for name in names])
    if args.build_only:
        print(binary, *ggufs.values(), sep="\n")
        return
    log = model_dir.parent / "llama-server.log"
    log.write_text("")
    prompts, single, prefill = workload(sizes)

    print(f"machine: {cpu_model()}, {cores()} cores")
    print(f"tessera: torch {torch.__version__}, OMP_NUM_THREADS={args.threads}; llama.cpp {llamacpp_version(binary)} "
          f"(llama-cpp-python {LLAMACPP_PYTHON_VERSION} sdist, Release, GGML_NATIVE), -t {args.threads} "
          f"-tb {args.threads}; one server at a time")
    print(f"workload: {sizes.streams} streams (prompts {sizes.prompt_range[0]}-{sizes.prompt_range[1]} random ids, "
          f"{sizes.stream_tokens} output tokens; llama-server --parallel {sizes.slots} -cb); one stream "
          f"({sizes.single_prompt}-token prompt, {sizes.single_tokens} output tokens, best of {sizes.repeats}; "
          f"--parallel 1)" + (f"; prefill {sizes.prefill} tokens" if sizes.prefill else "")
          + f"; greedy, EOS ignored, token ids in; {args.rounds} rounds, best of each"
          + ("; --quick: a smoke run, not a measurement" if args.quick else ""), flush=True)

    runs = {name: {"tessera": [], "llama.cpp": []} for name in names}
    for round_ in range(args.rounds):
        for name in names:
            precision = PRECISIONS[name]
            order = ["tessera", "llama.cpp"] if round_ % 2 == 0 else ["llama.cpp", "tessera"]
            for side in order:
                if side == "tessera":
                    run = run_tessera(model_dir, precision, args.kv_cache_dtype, args.threads, sizes, prompts, single,
                                      prefill, args.timeout)
                else:
                    run = run_llamacpp(binary, ggufs[precision.gguf], args.threads, sizes, prompts, single, prefill,
                                       kv_type(precision, args.llamacpp_kv, args.kv_cache_dtype), log)
                runs[name][side].append(run)
            print(f"round {round_ + 1}/{args.rounds} {name} ({', '.join(order)}): " + ", ".join(
                f"{side} {runs[name][side][-1].streams_s:.1f} s / {runs[name][side][-1].single_s:.2f} s"
                for side in order) + f" ({sizes.streams} streams / one stream)", flush=True)

    for name in names:
        report(name, PRECISIONS[name], args.kv_cache_dtype, kv_type(PRECISIONS[name], args.llamacpp_kv,
                                                                    args.kv_cache_dtype), sizes, runs[name])
    print(f"\nllama-server's log: {log}")


if __name__ == "__main__":
    main()
