"""The Dockerfiles and compose files agree with the code: every command parses with the real CLI, every port a
command serves is exposed, published and health-checked, the images share one hardened shape, and the
tokenizer image installs exactly what pyproject.toml asks for. `make test-compose` runs them for real."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from tessera.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip()]


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def ports_of(command: list[str]) -> set[int]:
    args = build_parser().parse_args(command)
    return {args.port} | ({args.metrics_port} if args.metrics_port else set())


def test_there_are_four_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.tpu",
                                             "Dockerfile.tokenizer"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_image_is_non_root_under_an_init_with_a_healthcheck_on_the_port_it_serves(dockerfile):
    steps = final_stage(dockerfile)
    values = {}
    for op, arguments in steps:
        values.setdefault(op, []).append(arguments)
    assert values["USER"] == ["10001:10001"]
    entrypoint = yaml.safe_load(values["ENTRYPOINT"][0])
    assert entrypoint[:2] == ["tini", "--"] and entrypoint[2] == "tessera"
    command = yaml.safe_load(values["CMD"][-1])
    ports = ports_of(command)  # a typo'd flag fails here
    assert {int(p) for line in values["EXPOSE"] for p in line.split()} == ports
    healthcheck = values["HEALTHCHECK"][0]
    health_command = yaml.safe_load(healthcheck.split("CMD", 1)[1])
    args = build_parser().parse_args(health_command[1:])
    assert health_command[:2] == ["tessera", "health"]
    assert args.address == f"localhost:{build_parser().parse_args(command).port}"
    labels = " ".join(values["LABEL"])
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    # The version label follows the package's version.
    assert f"VERSION={PYPROJECT['project']['version']}" in values["ARG"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_build_with_the_classic_builder_from_an_overridable_base(dockerfile):
    text = dockerfile.read_text()
    assert "# syntax=" not in text and "--mount" not in text and "<<" not in text  # BuildKit-only features
    steps = instructions(dockerfile)
    assert steps[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim")
    assert [arguments for op, arguments in steps if op == "FROM"] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    # Packages come from build args: pip's index (PIP_INDEX_URL), and for torch TORCH_INDEX_URL.
    arg_names = {arguments.split("=")[0] for op, arguments in steps if op == "ARG"}
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= arg_names
    if "torch==" in text:
        assert {"TORCH_VERSION", "TORCH_INDEX_URL"} <= arg_names


def test_the_tokenizer_image_installs_what_pyproject_asks_for_and_no_torch():
    steps = instructions(ROOT / "docker" / "Dockerfile.tokenizer")
    installed = [spec for op, arguments in steps if op == "RUN" and "pip install" in arguments
                 for spec in re.findall(r'"([^"]+)"', arguments)]
    declared = {re.split(r"[<>=!~ ;]", spec)[0]: spec for spec in PYPROJECT["project"]["dependencies"]}
    assert installed, "no requirements found"
    for spec in installed:
        assert declared[re.split(r"[<>=!~ ;]", spec)[0]] == spec
    assert "torch" not in {re.split(r"[<>=!~ ;]", s)[0] for s in installed}


COMPOSE_FILES = {"cpu": ["compose.yaml"], "cuda": ["compose.yaml", "compose.cuda.yaml"],
                 "tpu": ["compose.yaml", "compose.tpu.yaml"]}


def merged(files: list[str]) -> dict:
    """Compose's merge for what these files use: mappings merge, ports and volumes add up, other lists and
    scalars are replaced."""
    def merge(base, override, key=None):
        if isinstance(base, dict) and isinstance(override, dict):
            return {k: merge(base[k], v, k) if k in base else v for k, v in override.items()} | \
                   {k: v for k, v in base.items() if k not in override}
        if key in ("ports", "volumes"):
            return base + override
        return override
    result: dict = {}
    for name in files:
        result = merge(result, yaml.safe_load((ROOT / name).read_text()))
    return result


@pytest.mark.parametrize("variant", COMPOSE_FILES)
def test_compose_services_publish_what_they_serve_and_start_in_health_order(variant):
    services = merged(COMPOSE_FILES[variant])["services"]
    assert set(services) == {"engine", "tokenizer"}
    for name, service in services.items():
        assert (ROOT / service["build"]["dockerfile"]).exists()
        served = ports_of(service["command"])
        if service.get("network_mode") != "host":
            published = {int(p.rsplit(":", 1)[1]) for p in service["ports"]}
            assert published == served, name
        assert any(volume.endswith(":/model:ro") for volume in service["volumes"])
        assert service["environment"]["TESSERA_MODEL"] == "/model"
        assert int(service["stop_grace_period"].rstrip("s")) > build_parser().parse_args(service["command"]).grace
    assert services["tokenizer"]["depends_on"] == {"engine": {"condition": "service_healthy"}}
    engine_port = build_parser().parse_args(services["engine"]["command"]).port
    engines = build_parser().parse_args(services["tokenizer"]["command"]).engine
    host = "localhost" if services["engine"].get("network_mode") == "host" else "engine"
    assert engines == [f"{host}:{engine_port}"]
    device = build_parser().parse_args(services["engine"]["command"]).device
    assert services["engine"]["build"]["dockerfile"] == f"docker/Dockerfile.{device}"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) is not installed")
@pytest.mark.parametrize("variant", COMPOSE_FILES)
def test_compose_v1_accepts_the_files(variant):
    files = [arg for name in COMPOSE_FILES[variant] for arg in ("-f", str(ROOT / name))]
    out = subprocess.run(["docker-compose", *files, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
