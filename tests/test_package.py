import subprocess
import sys
from pathlib import Path

import ternlm


def test_import_is_light():
    # nothing heavy at import time: torch/transformers load on first use
    code = "import ternlm, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves_to_its_module():
    from ternlm import _LAZY

    for name in ternlm.__all__:
        if name == "__version__":
            continue
        obj = getattr(ternlm, name)
        assert callable(obj), name
        assert obj.__module__ == _LAZY[name], (name, obj.__module__)
    with __import__("pytest").raises(AttributeError, match="has no attribute 'nope'"):
        ternlm.nope


def _import_graph() -> dict:
    """ternlm module -> the ternlm modules it imports anywhere in its source (function-level imports too)."""
    import ast
    from pathlib import Path

    root = Path(ternlm.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_kernel_internals_stay_in_kernels():
    """Only ternlm.kernels touches the extension's private names and marshalling."""
    import re
    from pathlib import Path

    root = Path(ternlm.__file__).parent
    private = re.compile(r"_geometry|_FMT_ID|_QMAX|from ternlm\.kernels(\.\w+)? import .*\b_\w+|kernels\._ext")
    offenders = [f"{f.relative_to(root)}:{i}" for f in root.rglob("*.py") if "kernels" not in f.parts
                 for i, line in enumerate(f.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, offenders


PKG = Path(ternlm.__file__).parent


def _package_of(path: Path) -> str:
    """ternlm/nn/verify.py -> ternlm.nn; ternlm/checkpoint.py -> ternlm."""
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1])


def test_no_private_names_across_packages():
    """A package's private names (``_name``) stay inside it: another package imports public names only,
    so a refactor of one package cannot silently break another's reach into its internals."""
    import ast

    bad = []
    for path in sorted(PKG.rglob("*.py")):
        here = _package_of(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("ternlm"):
                continue
            mod = node.module
            # the package that owns the imported names: the module's package, or the package itself
            owner = mod if (PKG.parent / mod.replace(".", "/")).is_dir() else mod.rpartition(".")[0]
            if owner == here or (owner == "ternlm" and here == "ternlm"):
                continue
            for alias in node.names:
                if (mod, alias.name, here) == ("ternlm", "_C", "ternlm.kernels"):
                    continue  # the compiled extension is ternlm._C (setup.py's name); kernels is its one user
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} imports {alias.name} from {mod}")
    assert not bad, "\n".join(bad)
