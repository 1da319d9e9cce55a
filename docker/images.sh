#!/usr/bin/env bash
# `make images`: builds the four images and smoke-checks each; prints their sizes. Not in CI: the CUDA and
# TPU images are several GB. Build args pass through from the environment (TORCH_INDEX_URL, PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL; see the Dockerfiles); IMAGES="cpu tokenizer" builds a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_IMAGE=${PYTHON_IMAGE:-$(docker/base-image.sh)}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
args=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg "VERSION=$version"
      --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
      --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
for name in TORCH_INDEX_URL PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    if [ -n "${!name+set}" ]; then args+=(--build-arg "$name=${!name}"); fi
done

declare -A tag=([cpu]=tessera-engine-cpu [cuda]=tessera-engine-cuda [tpu]=tessera-engine-tpu [tokenizer]=tessera-tokenizer)
declare -A smoke=(
    [cpu]="from tessera.kernels import paged_attention_cpu as k; assert k.load(), 'native kernel'; print('native kernel loads')"
    [cuda]="import runpy, sys; sys.argv = ['', '--launcher']; runpy.run_module('tessera.kernels.compile_check', run_name='__main__')"
    [tpu]="import os; os.environ['PJRT_DEVICE'] = 'CPU'; import torch_xla; print('torch_xla', torch_xla.__version__)"
    [tokenizer]="import tessera.tokenizer.service; print('tokenizer role imports')"
)
for kind in ${IMAGES:-cpu tokenizer cuda tpu}; do
    echo "images: building ${tag[$kind]}:latest (docker/Dockerfile.$kind, base $PYTHON_IMAGE)"
    docker build -q -f "docker/Dockerfile.$kind" "${args[@]}" -t "${tag[$kind]}:latest" . >/dev/null
    docker run --rm "${tag[$kind]}:latest" --help >/dev/null
    docker run --rm --entrypoint python "${tag[$kind]}:latest" -c "${smoke[$kind]}"
    echo "images: ${tag[$kind]}:latest $(docker image inspect -f '{{.Size}}' "${tag[$kind]}:latest" | numfmt --to=iec)"
done
