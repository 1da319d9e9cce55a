"""deploy/k8s: every manifest is valid for the Kubernetes version we target, and every flag, port and gRPC health
service name in it is one that real tessera servers (started here from the manifests' own args) accept and serve."""
from __future__ import annotations

import copy
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import ServerProcess, free_port
from tessera.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DEMO = REPO / "models" / "tessera-demo"
# The oldest version the manifests need: native sidecars (on by default since 1.29), the preStop sleep action (1.30).
KUBERNETES_VERSION = "1.30"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


RESOURCES = {path.name: load(path) for path in MANIFESTS}


def of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for docs in RESOURCES.values() for doc in docs if doc["kind"] == kind}


DEPLOYMENTS, SERVICES = of_kind("Deployment"), of_kind("Service")


def containers(deployment: dict) -> list[dict]:
    pod = deployment["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def parse(args: list[str]):
    """The real CLI's parser: a misspelt flag or a bad value fails the test instead of exiting."""
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`tessera {shlex.join(args)}` does not parse")


# (deployment, container) for every container that runs a tessera server role.
SERVERS = [(name, c) for name, d in DEPLOYMENTS.items() for c in containers(d) if c.get("args", [""])[0] in
           ("engine", "tokenizer")]
SERVER_IDS = [f"{name}/{c['name']}" for name, c in SERVERS]


def app_generate_command() -> list[str]:
    """The `tessera generate ...` the example app's shell loop runs."""
    (app,) = DEPLOYMENTS["tessera-example-app"]["spec"]["template"]["spec"]["containers"]
    (line,) = [line for line in app["args"][0].splitlines() if line.strip().startswith("tessera generate")]
    return shlex.split(line.split(" & ")[0])


def with_value(args: list[str], flag: str, value: str) -> list[str]:
    """args with `flag`'s value replaced (the manifests' fixed ports and cluster DNS names do not work here)."""
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


# --- schemas -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path):
    assert RESOURCES[path.name], f"{path.name} is empty"
    for doc in RESOURCES[path.name]:
        # strict: unknown fields are errors, so a misspelt field fails rather than being silently dropped.
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_rejects_a_misspelt_field():
    deployment = copy.deepcopy(DEPLOYMENTS["tessera-engine-cpu"])
    engine = deployment["spec"]["template"]["spec"]["containers"][0]
    engine["livenesProbe"] = engine.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_is_the_cpu_stack_and_the_other_files_are_engine_variants():
    (kustomization,) = load(K8S / "kustomization.yaml")
    # Only resources: `kubectl apply -k` renders exactly these files, so validating them validates its output.
    assert set(kustomization) == {"apiVersion", "kind", "resources"}
    assert kustomization["resources"] == ["engine-service.yaml", "engine-cpu.yaml", "example-app.yaml"]
    assert set(RESOURCES) - set(kustomization["resources"]) == {"engine-cuda.yaml", "engine-tpu.yaml"}


# --- manifests against the CLI -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("deployment", "container"), SERVERS, ids=SERVER_IDS)
def test_ports_probes_and_grace_follow_the_servers_flags(deployment, container):
    args = parse(container["args"])
    image = f"tessera-engine-{args.device}" if args.command == "engine" else "tessera-tokenizer"
    assert container["image"] == f"{image}:latest"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": args.port,
                                                                          "metrics": args.metrics_port}
    for kind in PROBES:  # all three: liveness must wait for a startup probe, since loading is NOT_SERVING
        assert container[kind]["grpc"]["port"] == args.port, kind
    pod = DEPLOYMENTS[deployment]["spec"]["template"]["spec"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + args.grace  # the drain ends before SIGKILL


@pytest.mark.parametrize(("deployment", "container"), SERVERS, ids=SERVER_IDS)
def test_servers_run_as_uid_10001_on_a_read_only_root_with_their_caches_on_volumes(deployment, container):
    pod = DEPLOYMENTS[deployment]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert "/tmp" in mounts
    for env in container.get("env", []):
        if env["name"] in ("HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "TESSERA_XLA_CACHE_PATH"):
            assert any(Path(env["value"]).is_relative_to(m) for m in mounts), env


def test_services_route_named_ports_to_the_pods_they_select():
    for service in SERVICES.values():
        selector = service["spec"]["selector"]
        pods = [d["spec"]["template"] for d in DEPLOYMENTS.values()
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"{service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            # appProtocol tells meshes (Istio, Linkerd) the traffic is HTTP/2 gRPC or HTTP, not opaque TCP.
            assert port["appProtocol"] == {"grpc": "grpc", "metrics": "http"}[port["name"]]
            assert port["targetPort"] == port["name"]
            for pod in pods:
                numbers = [p["containerPort"] for c in [*pod["spec"].get("initContainers", []),
                                                        *pod["spec"]["containers"]]
                           for p in c.get("ports", []) if p["name"] == port["name"]]
                # Headless: clients dial pod IPs at the Service's port number, so it must be the container's.
                assert numbers == [port["port"]], port


def test_the_sidecar_dials_every_engine_variant_through_the_headless_service():
    engine = SERVICES["tessera-engine"]
    assert engine["spec"]["clusterIP"] == "None"  # DNS answers with the pods, for client-side balancing
    grpc_port = next(p["port"] for p in engine["spec"]["ports"] if p["name"] == "grpc")
    variants = [d for d in DEPLOYMENTS.values() if d["metadata"]["name"].startswith("tessera-engine-")]
    assert len(variants) == 3
    for variant in variants:
        assert engine["spec"]["selector"].items() <= variant["spec"]["template"]["metadata"]["labels"].items()
    (sidecar,) = DEPLOYMENTS["tessera-example-app"]["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before the app, down after it
    tokenizer = parse(sidecar["args"])
    assert tokenizer.engine == [f"dns:///{engine['metadata']['name']}:{grpc_port}"]
    assert parse(app_generate_command()[1:]).address == f"localhost:{tokenizer.port}"


# --- manifests against live servers --------------------------------------------------------------------------------

def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def container_named(deployment: str, name: str) -> dict:
    return next(c for c in containers(DEPLOYMENTS[deployment]) if c["name"] == name)


@pytest.fixture(scope="module")
def live():
    """The CPU engine and the sidecar tokenizer, run with their manifests' args on free loopback ports (the
    trailing --host/--port that ServerProcess adds win over the manifests'), the demo model and a small KV cache."""
    engine_args = container_named("tessera-engine-cpu", "engine")["args"]
    engine_args = with_value(engine_args, "--metrics-port", str(free_port()))
    with ServerProcess(*engine_args, "--model", str(DEMO), "--kv-cache-memory", "16MiB") as engine:
        tokenizer_args = container_named("tessera-example-app", "tokenizer")["args"]
        tokenizer_args = with_value(tokenizer_args, "--metrics-port", str(free_port()))
        # The same dns:/// scheme as in the cluster, with a name that resolves here.
        tokenizer_args = with_value(tokenizer_args, "--engine", f"dns:///localhost:{engine.port}")
        with ServerProcess(*tokenizer_args, "--model", str(DEMO)) as tokenizer:
            yield {"engine": engine, "tokenizer": tokenizer}


@pytest.mark.parametrize(("deployment", "container"), SERVERS, ids=SERVER_IDS)
def test_every_probe_names_a_service_the_live_server_reports_serving(live, deployment, container):
    # The CUDA and TPU engines run the same engine role, which registers the same health names as the CPU one.
    server = live[container["args"][0]]
    for kind in PROBES:
        service = container[kind]["grpc"].get("service", "")
        assert health(server.address, service) == SERVING, (kind, service)


def test_an_unknown_service_name_is_not_found(live):
    # What a probe with a typo'd service name would get (the kubelet counts it as a failure).
    with pytest.raises(grpc.RpcError) as error:
        health(live["engine"].address, "tessera.engine.v1.Engin")
    assert error.value.code() is grpc.StatusCode.NOT_FOUND


def test_without_engines_the_sidecar_is_alive_but_not_ready():
    """Startup and liveness must not depend on the engines (the app would never start, or the sidecar would be
    restarted for nothing); readiness does."""
    sidecar = container_named("tessera-example-app", "tokenizer")
    port = free_port()
    args = with_value(sidecar["args"], "--engine", f"127.0.0.1:{free_port()}")  # nothing listens there
    args = with_value(with_value(args, "--port", str(port)), "--metrics-port", str(free_port()))
    command = [sys.executable, "-m", "tessera.cli", *args, "--host", "127.0.0.1", "--model", str(DEMO)]
    process = subprocess.Popen(command)
    try:
        address, startup = f"127.0.0.1:{port}", sidecar["startupProbe"]["grpc"]["service"]
        deadline = time.monotonic() + 60
        while True:
            try:
                if health(address, startup) == SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the tokenizer did not start"
            time.sleep(0.1)
        assert health(address, sidecar["livenessProbe"]["grpc"]["service"]) == SERVING
        assert health(address, sidecar["readinessProbe"]["grpc"]["service"]) == NOT_SERVING
    finally:
        process.terminate()
        process.wait(30)


def test_the_apps_generate_command_streams_through_the_sidecar(live):
    command = with_value(app_generate_command(), "--address", live["tokenizer"].address)
    done = subprocess.run([sys.executable, "-m", "tessera.cli", *command[1:]], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def fib(n):") and len(done.stdout.strip()) > len("def fib(n):")


def sleeping(pid: int) -> bool:
    return subprocess.run(["pgrep", "-P", str(pid), "-x", "sleep"], capture_output=True, check=False).returncode == 0


def test_the_app_loop_exits_at_once_on_sigterm(live):
    """The pod's shutdown waits for the app before it stops the sidecar, so the app must not sit out the grace
    period (sh as PID 1 ignores an untrapped SIGTERM)."""
    (app,) = DEPLOYMENTS["tessera-example-app"]["spec"]["template"]["spec"]["containers"]
    assert app["command"] == ["/bin/sh", "-c"]
    script = app["args"][0].replace("localhost:50051", live["tokenizer"].address)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `tessera`
    loop = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert loop.stdout.readline().startswith("def fib(n):")
        deadline = time.monotonic() + 60
        while not sleeping(loop.pid):  # the completion is done: SIGTERM it in its sleep between two
            assert time.monotonic() < deadline and loop.poll() is None
            time.sleep(0.05)
        loop.send_signal(signal.SIGTERM)
        assert loop.wait(5) == 0  # the trap ran at once, not after the sleep, and exited cleanly
    finally:
        loop.kill()
        loop.wait()
