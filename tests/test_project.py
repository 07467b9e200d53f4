"""Project hygiene: the README's test command is what CI runs; the CLI's start-up stays light."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_install_and_test_and_ci_runs_that_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block is not None and readme.index("```bash") < readme.index("## ")
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].startswith("pip install")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, f"{commands[1]!r} is not what .ci/run runs"
    assert ci.index('pip install --quiet "torch==2.13.0"') < ci.index("pip install --quiet -e")


def test_torch_is_not_pinned_to_one_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+"', pyproject) and "torch==" not in pyproject


def test_core_modules_import_neither_typer_nor_flwr():
    import ast

    core = [p for p in (ROOT / "fedlora_cli").rglob("*.py") if not {"commands", "flower"} & set(p.parts)]
    core = [p for p in core if p.name != "app.py"]
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])  # fmt: skip
            for name in names:
                assert name.split(".")[0] not in ("typer", "click", "flwr"), (
                    f"{path.relative_to(ROOT)} imports {name}"
                )
