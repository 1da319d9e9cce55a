"""The folder layout shows the three roles: the engine and the worker meet only at the step contract.

Read from the source with `ast` (every import, including the lazy ones inside functions), so the test needs no
import side effects and fails the moment an engine module reaches into the worker role, or the other way round.
"""
from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parent.parent / "services"

# The engine drives an in-process worker by default; this one module builds it.
IN_PROCESS_WIRING = SERVICES / "engine" / "local_worker.py"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            # `from tessera import step` imports a module too
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def role_sources(role: str) -> list[Path]:
    return [p for p in (SERVICES / role).rglob("*.py") if "v1" not in p.relative_to(SERVICES).parts]


def reaches_into(modules: set[str], role: str) -> set[str]:
    """Imports of `role`'s own code (its generated v1 stubs are the wire contract and do not count)."""
    prefix = f"tessera.{role}"
    return {m for m in modules if (m == prefix or m.startswith(prefix + ".")) and not m.startswith(prefix + ".v1")}


def test_the_engine_role_imports_the_worker_role_only_in_the_in_process_wiring():
    sources = role_sources("engine")
    assert IN_PROCESS_WIRING in sources
    offenders = {str(p.relative_to(SERVICES)): sorted(reaches_into(imported_modules(p), "worker"))
                 for p in sources if p != IN_PROCESS_WIRING}
    assert {p: m for p, m in offenders.items() if m} == {}
    # ... and the wiring really is where the worker comes from
    assert reaches_into(imported_modules(IN_PROCESS_WIRING), "worker")


def test_the_worker_role_imports_nothing_of_the_engine_role():
    offenders = {str(p.relative_to(SERVICES)): sorted(reaches_into(imported_modules(p), "engine"))
                 for p in role_sources("worker")}
    assert {p: m for p, m in offenders.items() if m} == {}
    assert len(role_sources("worker")) > 10  # the model runner, models, attention, sampler, XLA, service


def test_the_shared_modules_belong_to_no_role():
    for name in ("step.py", "sampling_params.py", "model_config.py", "serving.py", "metrics.py"):
        modules = imported_modules(SERVICES / name)
        assert not reaches_into(modules, "engine") and not reaches_into(modules, "worker"), name
        assert not reaches_into(modules, "tokenizer"), name


def test_the_tokenizer_role_speaks_only_the_engine_contract():
    for path in role_sources("tokenizer"):
        modules = imported_modules(path)
        assert not reaches_into(modules, "worker"), path
        assert not reaches_into(modules, "engine") - {"tessera.engine.v1"}, path


def test_the_clone_root_does_not_shadow_the_kernels_package_transformers_imports():
    """From the clone's root (python -m, python -c) kernels/ is also a top-level `kernels`; imported by that
    name it hands over to the installed package of that name, or fails as a missing module would."""
    import importlib.util
    import subprocess
    import sys

    root = SERVICES.parent
    probe = "import kernels; print(kernels.__file__)"
    if importlib.util.find_spec("kernels") is not None:  # transformers' optional hub-kernels dependency
        found = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
        assert Path(found.stdout.strip()).resolve() != (root / "kernels" / "__init__.py")
    # Without one (no site-packages: -S), a plain ModuleNotFoundError, and no half-made module left behind.
    missing = subprocess.run(
        [sys.executable, "-S", "-c", "import sys\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
         "    print(e.name, 'kernels' in sys.modules)"], cwd=root, capture_output=True, text=True, check=True)
    assert missing.stdout.split() == ["kernels", "False"]
