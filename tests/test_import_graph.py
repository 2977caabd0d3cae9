"""The import graph of albef/ and flows/, read from the source (every import, at module level or inside a
function): no module reaches for another module's private names, no two modules import each other (directly or
round a loop), and the shared helpers at the bottom import nothing above them (issue 17, item 4)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "albef").rglob("*.py"), *(REPO / "flows").rglob("*.py")])
# The bottom layer: what every stage, evaluation and service shares (settings, files, devices, processes,
# weights, tokenizer, schedules). They may import each other, nothing above.
BOTTOM = (
    "albef.config",
    "albef.io",
    "albef.device",
    "albef.distributed",
    "albef.world",
    "albef.model_files",
    "albef.safe_load",
    "albef.tokenizer",
    "albef.schedule",
)


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in SOURCES}


def _ours(name: str) -> bool:
    return name.split(".")[0] in ("albef", "flows")


def _imports() -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)} for every import of albef or flows."""
    found: dict[str, set[tuple[str, str | None]]] = defaultdict(set)
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _ours(node.module):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found[name].add((sub, None) if sub in MODULES else (node.module, alias.name))
            elif isinstance(node, ast.Import):
                found[name].update((alias.name, None) for alias in node.names if _ours(alias.name))
    return found


IMPORTS = _imports()


def test_no_module_imports_another_modules_private_names():
    private = sorted(
        f"{module} imports {name} from {source}"
        for module, items in IMPORTS.items()
        for source, name in items
        if name is not None and name.startswith("_") and source != module
    )
    assert not private, "\n".join(private)


def test_no_import_cycle_between_modules():
    graph = {m: {target for target, _ in items if target in MODULES} for m, items in IMPORTS.items()}
    # (a package imports its own modules in __init__, which is not a cycle of theirs)
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_shared_helpers_at_the_bottom_import_nothing_above_them():
    upward = sorted(
        f"{module} imports {target}"
        for module in BOTTOM
        for target, _ in IMPORTS.get(module, ())
        if target != "albef" and not target.startswith(BOTTOM)
    )
    assert not upward, "\n".join(upward)


def test_evaluation_does_not_import_training():
    """Evaluation is below training (the training stages validate with it); the one arrow that ran back up, the
    distributed helpers, now lives at the bottom (albef.distributed)."""
    upward = sorted(
        f"{module} imports {target}"
        for module, items in IMPORTS.items()
        if module.startswith("albef.eval")
        for target, _ in items
        if target.startswith("albef.train")
    )
    assert not upward, "\n".join(upward)
