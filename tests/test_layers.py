"""The layers stay honest: read every import of the package (also those inside functions) with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedlora_cli"
CLI = (
    "app.py",
    "__main__.py",
    "commands/",
)  # the terminal layer: the only place typer (and click) may be imported
ADAPTERS = ("flower/",)  # the only place flwr may be imported
ENGINE_CHOICE = ("engines.py", "workflows.py")  # pick an engine: may reach the Flower adapter, not typer


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, set[str]]:
    return {p.relative_to(PACKAGE).as_posix(): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def uses(names: set[str], top: str) -> bool:
    return any(n == top or n.startswith(top + ".") for n in names)


def test_typer_and_click_only_in_the_cli_layer():
    offenders = [m for m, names in modules().items() if (uses(names, "typer") or uses(names, "click"))
                 and not m.startswith(CLI)]  # fmt: skip
    assert not offenders, offenders


def test_flwr_only_in_the_flower_adapter():
    offenders = [m for m, names in modules().items() if uses(names, "flwr") and not m.startswith(ADAPTERS)]
    assert not offenders, offenders


def test_the_core_imports_neither_the_cli_nor_the_flower_adapter_nor_the_engine_choice():
    outer = ("fedlora_cli.commands", "fedlora_cli.app", "fedlora_cli.flower", "fedlora_cli.engines")
    core = {m: n for m, n in modules().items() if not m.startswith(CLI + ADAPTERS + ENGINE_CHOICE)}
    assert "federation/lifecycle.py" in core and "strategies/base.py" in core  # it looks where it should
    offenders = {m: sorted(x for x in n if x.startswith(outer)) for m, n in core.items()}
    offenders = {m: x for m, x in offenders.items() if x}
    assert not offenders, offenders


def test_the_flower_adapter_does_not_import_the_cli():
    offenders = [m for m, names in modules().items() if m.startswith(ADAPTERS)
                 and (uses(names, "fedlora_cli.commands") or uses(names, "fedlora_cli.app"))]  # fmt: skip
    assert not offenders, offenders


def test_every_engine_name_has_an_engine():
    from fedlora_cli.config import ENGINES as NAMES
    from fedlora_cli.engines import ENGINES

    assert tuple(ENGINES) == NAMES
