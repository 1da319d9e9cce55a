"""tessera.kernels: the Triton and native CPU kernels (pyproject.toml maps this directory to that name).

Run from the clone's root (`python -m ...`, `python -c`), Python also finds this directory as a top-level
`kernels`, which would shadow the unrelated `kernels` package that transformers (5.x) imports for its hub
kernels. Imported under that name, this module hands the import on to the installed package.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _clone = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _clone])
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (this clone's kernels/ is tessera.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns once this module's body has run
    _spec.loader.exec_module(_module)
