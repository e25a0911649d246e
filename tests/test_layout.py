"""The folder list is the architecture, and these tests keep it so.

- `metering/` and `backends/` never import `proxy/`; `backends/` never imports `metering/`;
  `metering/` imports no web framework and no HTTP client (it measures and accounts);
- no import circle between the project's modules (every import counts, also the ones
  inside functions: a circle that only a late import hides is still a circle);
- at most 8 modules at `metering/`'s top level, none over 600 lines anywhere (data tables
  live in data files), no `sys.path` patching in `bench/`;
- the contract is `docs/INTERFACE.md`, in the repository, and the code points there.
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

PACKAGES = ("proxy", "backends", "metering")
WEB_AND_HTTP = ("fastapi", "starlette", "uvicorn", "aiohttp", "httpx", "prometheus_client")
MAX_LINES = 600
MAX_METERING_TOP_MODULES = 8


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the modules it imports: the project's own (as module names) and others
    (as their top-level package names, prefixed "ext:")."""
    paths = {module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pkg import mod` imports the module pkg.mod, where there is one.
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                out.add(t if t in paths else "ext:" + t.split(".")[0])
        graph[name] = out
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module, or a
    module that imports itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in graph[v]:
                        found.append(sorted(comp))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO_ROOT, PACKAGES)


def crossings(graph: Mapping[str, set[str]], src: str, banned: Iterable[str]) -> list[str]:
    bad = tuple(banned)
    return sorted(
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m == src or m.startswith(src + ".")
        for t in targets
        if any(t == b or t.startswith(b + ".") for b in bad)
    )


def test_metering_and_backends_never_import_the_server(graph: dict[str, set[str]]) -> None:
    assert crossings(graph, "metering", ["proxy"]) == []
    assert crossings(graph, "backends", ["proxy"]) == []


def test_backends_never_import_metering(graph: dict[str, set[str]]) -> None:
    assert crossings(graph, "backends", ["metering"]) == []


def test_metering_imports_no_web_framework_or_http_client(graph: dict[str, set[str]]) -> None:
    assert crossings(graph, "metering", [f"ext:{n}" for n in WEB_AND_HTTP]) == []


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_circle_check_finds_a_circle_when_one_is_added(tmp_path: Path) -> None:
    """The same check, on a copy of the project with one import added that closes a circle
    (metering.meter is imported by proxy's relay; here it imports the relay back)."""
    for pkg in PACKAGES:
        for src in (REPO_ROOT / pkg).rglob("*.py"):
            dst = tmp_path / src.relative_to(REPO_ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    assert cycles(import_graph(tmp_path, PACKAGES)) == []
    meter = tmp_path / "metering" / "meter.py"
    meter.write_text(
        meter.read_text(encoding="utf-8") + "\n\ndef _late() -> None:\n"
        "    from proxy.relay.route import MeteredRoute  # noqa: F401\n",
        encoding="utf-8",
    )
    found = cycles(import_graph(tmp_path, PACKAGES))
    assert len(found) == 1 and {"metering.meter", "proxy.relay.route"} <= set(found[0])


def test_cycles_sees_a_self_import_and_leaves_outside_names_alone() -> None:
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b", "ext:os"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_metering_top_level_stays_small() -> None:
    top = sorted(p.name for p in (REPO_ROOT / "metering").glob("*.py"))
    assert len(top) <= MAX_METERING_TOP_MODULES, top


def tracked_python_files() -> list[Path]:
    if (REPO_ROOT / ".git").exists():
        done = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return [REPO_ROOT / f for f in done.stdout.split() if (REPO_ROOT / f).exists()]
    dirs = (*PACKAGES, "bench", "tests")
    return [p for d in dirs for p in (REPO_ROOT / d).rglob("*.py")]


def test_no_module_over_600_lines() -> None:
    long = {
        str(p.relative_to(REPO_ROOT)): n
        for p in tracked_python_files()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_bench_scripts_import_the_package_without_patching_sys_path() -> None:
    patched = [
        f"{p.name}:{i}"
        for p in sorted((REPO_ROOT / "bench").glob("*.py"))
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"sys\.path\.(insert|append)|sys\.path\s*=", line)
    ]
    assert patched == []


def test_the_contract_is_in_the_repository_and_the_code_points_to_it() -> None:
    assert (REPO_ROOT / "docs" / "INTERFACE.md").is_file()
    loose = [
        f"{p.relative_to(REPO_ROOT)}:{i}"
        for p in tracked_python_files()
        if p.parts[len(REPO_ROOT.parts)] in PACKAGES
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"(?<!docs/)INTERFACE\.md", line)
    ]
    assert loose == []
