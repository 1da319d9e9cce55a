#!/usr/bin/env bash
# `make test-compose`: the compose stack for real, on a machine that may have no image registry.
#   1. a Docker engine (installs Debian's docker.io / docker-compose and starts dockerd if none answers)
#   2. the base image: python:3.11-slim if present or pullable, else a stand-in (docker/base-image.sh)
#   3. the CPU engine and tokenizer images, with torch from the host's own pip configuration (docker/wheels/)
#   4. `up`, both healthchecks, a greedy stream through the published port checked against the in-process
#      engine, a long stream that finishes while `stop` drains both services (which must exit 0), and the
#      sidecar pattern: a client container in the tokenizer's network namespace reaches it on localhost
#   5. `down`: no container, network or volume is left; images stay as the cache for the next run.
# Needs root (or a docker group) and the project venv (PYTHON=.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export COMPOSE_PROJECT_NAME=tessera-test-compose
say() { echo "test-compose: $*"; }

# 1. The engine and the tools.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
started_dockerd=
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd"
    dockerd --storage-driver=overlay2 --mtu=1400 >/tmp/tessera-test-compose-dockerd.log 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null
fi
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
say "compose: $("${compose[@]}" version --short 2>/dev/null || "${compose[@]}" version | head -1)"

ours=()  # files this run put in docker/wheels/
cleanup() {
    rm -f "${ours[@]}"
    "${compose[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    docker rm -f "$COMPOSE_PROJECT_NAME-sidecar" >/dev/null 2>&1 || true
    if [ -n "$started_dockerd" ]; then kill "$started_dockerd" && wait "$started_dockerd" || true; fi
}
trap cleanup EXIT
"${compose[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true  # a run killed earlier

# 2. The base image.
PYTHON_IMAGE=$(docker/base-image.sh)
export PYTHON_IMAGE

# 3. The images. torch comes from wherever the host's pip takes it (its configuration, never a host written
# here): its wheel goes into docker/wheels/, which every build searches first.
# It is removed again at the end, so that a later CUDA build does not find a CPU torch there.
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile.cpu)
wheels=$(mktemp -d)
"$PYTHON" -m pip download -q --no-deps --dest "$wheels" "torch==$torch_version" 2>/dev/null
for wheel in "$wheels"/*.whl; do
    [ -e "docker/wheels/${wheel##*/}" ] || { mv "$wheel" docker/wheels/; ours+=("docker/wheels/${wheel##*/}"); }
done
rmdir "$wheels" 2>/dev/null || rm -rf "$wheels"
export TORCH_INDEX_URL=
index=$("$PYTHON" -m pip config get global.index-url 2>/dev/null || true)
case "$index" in http*) export PIP_INDEX_URL=$index ;; esac  # a file:// index is not visible inside a build
say "building images (base $PYTHON_IMAGE)"
start=$SECONDS
"${compose[@]}" build -q
say "built in $((SECONDS - start)) s: $(docker image inspect -f '{{.Size}}' tessera-engine-cpu:latest | numfmt --to=iec) engine," \
    "$(docker image inspect -f '{{.Size}}' tessera-tokenizer:latest | numfmt --to=iec) tokenizer"

# 4. Up, healthy, streams, stop.
start=$SECONDS
"${compose[@]}" up -d
engine=$("${compose[@]}" ps -q engine)
tokenizer=$("${compose[@]}" ps -q tokenizer)
for _ in $(seq 180); do
    states="$(docker inspect -f '{{.State.Health.Status}}' "$engine" "$tokenizer" | tr '\n' ' ')"
    [ "$states" = "healthy healthy " ] && break
    case "$states" in *unhealthy*|*exited*) break ;; esac
    sleep 1
done
if [ "$states" != "healthy healthy " ]; then
    "${compose[@]}" logs --tail 50
    say "not healthy: $states"; exit 1
fi
say "both services healthy in $((SECONDS - start)) s"

"$PYTHON" docker/compose_check.py stream

# The sidecar pattern: a client container in the tokenizer's network namespace, reaching it on localhost.
docker run --rm --name "$COMPOSE_PROJECT_NAME-sidecar" --network "container:$tokenizer" tessera-tokenizer:latest \
    generate --address localhost:50051 --max-tokens 8 "def fibonacci(n):" >/tmp/tessera-sidecar.out
say "sidecar: $(tr '\n' ' ' </tmp/tessera-sidecar.out | cut -c1-80)"
[ -s /tmp/tessera-sidecar.out ]

"$PYTHON" docker/compose_check.py stream-through-stop "${compose[@]}" stop
codes="$(docker inspect -f '{{.State.ExitCode}}' "$engine" "$tokenizer" | tr '\n' ' ')"
[ "$codes" = "0 0 " ] || { "${compose[@]}" logs --tail 50; say "exit codes after stop: $codes"; exit 1; }
say "stop drained the stream; both services exited 0"

# 5. Down, and nothing of ours is left.
"${compose[@]}" down --volumes --remove-orphans
left="$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")"
left+="$(docker network ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")"
left+="$(docker volume ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")"
[ -z "$left" ] || { say "left behind: $left"; exit 1; }
say "passed"
