"""The package's layering, read from its imports (also those inside functions).

* ``core/`` imports torch and the standard library only;
* an adapter (``mergekit/``, ``fusion_bench/``) imports neither the other adapter nor the CLI;
* ``pave purify`` imports no host (neither mergekit nor FusionBench, nor their adapters);
* no import cycle between the package's modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pave_plugins"
ADAPTERS = ("pave_plugins.mergekit", "pave_plugins.fusion_bench")
HOSTS = ("mergekit", "fusion_bench", "pave_plugins.mergekit", "pave_plugins.fusion_bench")


def module_imports(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: names it imports}`` for every ``.py`` under ``root`` (relative imports resolved;
    ``from a import b`` counts as ``a.b`` when that is a module of the package, else ``a``)."""
    files = {f: ".".join((package, *f.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
             for f in root.rglob("*.py")}
    modules = set(files.values())
    out: dict[str, set[str]] = {}
    for f, mod in files.items():
        names: set[str] = set()
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    names.add(full if full in modules else base)
        out[mod] = names
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(root: Path, package: str = "pave_plugins") -> list[str]:
    imports = module_imports(root, package)
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for mod, names in sorted(imports.items()):
        for name in sorted(names):
            top = name.split(".")[0]
            if _under(mod, (f"{package}.core",)) and not (
                top in stdlib or top == "torch" or _under(name, (f"{package}.core",))
            ):
                bad.append(f"{mod} (core) imports {name}")
            adapter = next((a for a in ADAPTERS if _under(mod, (a.replace("pave_plugins", package),))), None)
            if adapter is not None:
                others = tuple(a.replace("pave_plugins", package) for a in ADAPTERS if a != adapter)
                if _under(name, (*others, f"{package}.cli")):
                    bad.append(f"{mod} (adapter) imports {name}")
            if mod == f"{package}.cli.purify" and _under(name, tuple(h.replace("pave_plugins", package) for h in HOSTS)):
                bad.append(f"{mod} (pave purify) imports the host {name}")
    graph = {m: {n for n in names if n in imports} for m, names in imports.items()}
    bad += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return bad


def test_package_layering():
    assert violations(PACKAGE) == []


def test_layering_check_finds_planted_violations(tmp_path):
    pkg = tmp_path / "pkg"
    for sub in ("core", "mergekit", "fusion_bench", "cli", "bench"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "core" / "maths.py").write_text("import torch\nimport math\n\ndef f():\n    import transformers\n")
    (pkg / "mergekit" / "a.py").write_text("from pkg.fusion_bench import b\n")
    (pkg / "fusion_bench" / "b.py").write_text("from ..cli import main\n")
    (pkg / "cli" / "purify.py").write_text("def run():\n    from mergekit.io import tensor_writer\n")
    (pkg / "bench" / "harness.py").write_text("def f():\n    from . import hosts\n")
    (pkg / "bench" / "hosts.py").write_text("from .harness import f\n")
    found = violations(pkg, "pkg")
    assert found == [
        "pkg.cli.purify (pave purify) imports the host mergekit.io",
        "pkg.core.maths (core) imports transformers",
        "pkg.fusion_bench.b (adapter) imports pkg.cli",
        "pkg.mergekit.a (adapter) imports pkg.fusion_bench.b",
        "import cycle: pkg.bench.harness -> pkg.bench.hosts",
    ], found
