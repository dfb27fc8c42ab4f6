"""The module graph, read from the source (every import, in functions too): no cycle, and
imports flow one way, from the top floor down.

Floors: lorydata at the ground; pipelines and lorytrain above it; cli and benchmarks on
top. Inside lorytrain and pipelines the floors below hold too, and no pipelines stage
imports another stage (stages meet only in files, through `pipelines.layout`).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lorydata", "lorytrain", "pipelines")
# What each top-level part may import from the project.
MAY_IMPORT = {
    "lorydata": {"lorydata"},
    "pipelines": {"lorydata", "pipelines"},
    "lorytrain": {"lorydata", "lorytrain"},
    "cli": {"lorydata", "lorytrain", "pipelines"},
    "benchmarks": {"lorydata", "lorytrain", "pipelines", "cli", "benchmarks"},
}
# Floors inside a package (longest prefix wins): a module imports only its own floor or lower.
FLOORS = {
    "lorytrain.errors": 0, "lorytrain.agreement": 0, "lorytrain.model": 1, "lorytrain": 1,
    "lorytrain.evaluation": 2, "lorytrain.generation": 2, "lorytrain.training": 3, "lorytrain.runs": 4,
    "lorytrain.analysis": 5, "lorytrain.export": 5, "lorytrain.harness": 5,
    "pipelines.fileio": 0, "pipelines.commits": 0, "pipelines.options": 0, "pipelines.runner": 0,
    "pipelines.layout": 1,
    "pipelines.markers": 1, "pipelines.dead_letters": 1, "pipelines": 1, "pipelines.documents": 2,
    "pipelines.embed": 2, "pipelines.order": 2, "pipelines.shards": 2, "pipelines.build_corpus": 3,
}
STAGES = ("pipelines.documents", "pipelines.embed", "pipelines.order", "pipelines.shards")


def module_files() -> dict[str, Path]:
    files = {"cli": ROOT / "cli.py"}
    for top in (*PACKAGES, "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def imports(files: dict[str, Path]) -> dict[str, set[str]]:
    """{module: project modules it imports}, relative imports resolved, names of modules
    imported from a package counted as the modules."""

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            found |= {target for target in map(resolve, names) if target and target != module}
        graph[module] = found
    return graph


def floor(module: str) -> int | None:
    matches = [prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")]
    return FLOORS[max(matches, key=len)] if matches else None


def test_the_module_graph_has_no_cycle():
    graph = imports(module_files())
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " → ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_imports_flow_down_the_floors():
    wrong = []
    for module, targets in imports(module_files()).items():
        top = module.split(".")[0]
        for target in targets:
            if target.split(".")[0] not in MAY_IMPORT[top]:
                wrong.append(f"{module} → {target}")
            elif top == target.split(".")[0] and top in ("lorytrain", "pipelines") and floor(target) > floor(module):
                wrong.append(f"{module} (floor {floor(module)}) → {target} (floor {floor(target)})")
    assert not wrong, "imports against the floors:\n" + "\n".join(sorted(wrong))


def test_no_pipelines_stage_imports_another():
    wrong = []
    for module, targets in imports(module_files()).items():
        own = next((s for s in STAGES if module == s or module.startswith(s + ".")), None)
        if own is None:
            continue
        wrong += [f"{module} → {t}" for t in targets
                  if any(t == s or t.startswith(s + ".") for s in STAGES if s != own)]
    assert not wrong, "stages meet in files, not imports:\n" + "\n".join(wrong)


def test_every_module_has_a_floor():
    missing = [m for m in module_files() if m.split(".")[0] in ("lorytrain", "pipelines") and floor(m) is None]
    assert not missing
