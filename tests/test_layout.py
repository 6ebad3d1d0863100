"""The library's shape, checked: imports point one way (commands -> library, trainer ->
components, results and artifacts), no import cycle, module and method sizes, one exit-code
table (errors.py = the README's), checkpoint parts declared in one place."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from commands import REPO

DISTRES = REPO / "distres"
# the command modules `python -m distres.X` runs: they only hand over to distres.cli
SHIMS = {"distres.train", "distres.evaluate", "distres.export", "distres.predict",
         "distres.report", "distres.launch", "distres.data.shards.__main__"}  # fmt: skip


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, set[str]]:
    """Each module of the package at `root` -> the package's modules it imports, at module
    level or inside functions (a lazy import is still a dependency); TYPE_CHECKING-only
    imports left out (annotations, no dependency at run time)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                # `from pkg import mod` depends on mod; `from mod import name` on mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]  # fmt: skip
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package's __init__ importing its own modules is how a package is made
            real = [m for m in component if not any(
                o.startswith(m + ".") for o in component)]  # fmt: skip
            if len(real) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_distres():
    assert cycles(imports(DISTRES)) == []


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    assert cycles(imports(pkg)) == [["pkg.a", "pkg.sub.b"]]


def test_nothing_imports_the_commands():
    graph = imports(DISTRES)
    offenders = {m: sorted(d for d in deps if d.startswith("distres.cli"))
                 for m, deps in graph.items()
                 if not m.startswith("distres.cli") and m not in SHIMS}  # fmt: skip
    assert {m: d for m, d in offenders.items() if d} == {}
    # and a shim is only that: nothing imports one
    assert not {m for m, deps in graph.items() if deps & SHIMS}


LOWER = ("distres.components", "distres.results", "distres.artifacts", "distres.data",
         "distres.engine", "distres.checkpoint")  # fmt: skip


@pytest.mark.parametrize("lower", LOWER)
def test_the_trainer_imports_its_components_never_the_reverse(lower):
    graph = imports(DISTRES)
    up = {m: sorted(d for d in deps if d.startswith("distres.trainer"))
          for m, deps in graph.items() if m.startswith(lower)}  # fmt: skip
    assert {m: d for m, d in up.items() if d} == {}


def test_components_and_artifacts_know_nothing_of_results():
    graph = imports(DISTRES)
    for m, deps in graph.items():
        if m.startswith(("distres.components", "distres.artifacts", "distres.data")):
            assert not {d for d in deps if d.startswith("distres.results")}, m


def test_modules_and_the_loop_stay_small():
    sizes = {p.relative_to(REPO): len(p.read_text().splitlines()) for p in DISTRES.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}
    from distres.trainer.loop import Trainer

    assert len(inspect.getsource(Trainer.fit).splitlines()) <= 60
    assert len(inspect.getsource(Trainer.finish).splitlines()) <= 40
    # the EMA is a component build.py wires in (an EvalTarget, a step hook, a tensor part):
    # the loop has no branch on it
    loop = (DISTRES / "trainer" / "loop.py").read_text()
    assert not re.search(r"self\.ema\b|WeightEma|ema_decay|checkpoint\.final_weights ==", loop)


def test_the_readme_exit_code_table_is_errors_py():
    from distres.errors import EXIT_CODES

    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES


def test_checkpoint_parts_are_declared_once_and_the_store_knows_none():
    from distres.checkpoint.parts import TENSOR
    from distres.trainer.state import PARTS

    names = [p.name for p in PARTS]
    assert len(names) == len(set(names))
    assert all(p.check is not None for p in PARTS if p.scope != TENSOR)
    store = (DISTRES / "checkpoint" / "store.py").read_text()
    manager = (DISTRES / "checkpoint" / "manager.py").read_text()
    for name in names:
        assert f'"{name}"' not in store and f'"{name}"' not in manager, name
