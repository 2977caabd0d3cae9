"""The import graph of albef/ and flows/, read from the source (every import, at module level or inside a
function): no module reaches for another module's private names, no two modules import each other (directly or
round a loop), and the shared helpers at the bottom import nothing above them (issue 17, item 4)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import import_diagram  # noqa: E402  (the one reader of the import graph; it also draws the README's picture)

BOTTOM = import_diagram.BOTTOM
MODULES = import_diagram.sources(REPO)
IMPORTS = import_diagram.imports(REPO)


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


def test_the_readme_layout_picture_is_the_current_import_graph():
    assert import_diagram.readme_block(REPO / "README.md") == import_diagram.render(REPO), (
        "README.md's import diagram is stale: run python benchmarks/import_diagram.py --readme README.md"
    )
