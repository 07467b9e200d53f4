"""The docs: the generated CLI reference covers the whole command tree, the README stays a door, and the
test subsets it promises hold (`-m "not slow"` leaves out every Flower and real-data test)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import typer.main

from fedlora_cli.app import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hook():
    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands(command, path):
    yield path, command
    if hasattr(command, "commands"):  # a group (duck-typed: Typer may bundle its own Click)
        for name, sub in command.commands.items():
            if not sub.hidden:
                yield from commands(sub, f"{path} {name}")


def test_the_cli_reference_lists_every_command_option_and_choice(hook):
    page = hook.render()
    sections = re.split(r"\n#+ `", page)
    by_name = {s.split("`", 1)[0]: s for s in sections[1:]}
    tree = list(commands(typer.main.get_command(app), "fedlora"))
    assert {"fedlora rounds", "fedlora runs list"} <= set(by_name)
    assert set(by_name) == {path for path, _ in tree}
    for path, command in tree:
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert f"`{param.opts[0]}`" in by_name[path], (path, param.opts[0])
                if getattr(param.type, "choices", None):
                    assert all(f"`{getattr(c, 'value', c)}`" in by_name[path] for c in param.type.choices)
    assert "`svd` \\| `naive`" in by_name["fedlora rounds"]  # choices, escaped for the table


def test_table_cells_escape_markdown_and_keep_code_spans(hook):
    # Rich markup, as `-h` renders it: `\[` is a literal bracket, `[bold]` a style
    cell = hook._cell("client_<i>.json | [bold]r[/bold] \\[default: 8]")
    assert cell == "client\\_&lt;i&gt;.json \\| r \\[default: 8\\]"
    assert hook._cell("see `fedlora shard` or a|b") == "see `fedlora shard` or a\\|b"


def test_the_readme_is_a_door_whose_links_resolve(hook):
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert hook.readme_missing_files(ROOT) == []
    assert "docs/guide/install.md" in readme and 'python -m pytest -q -m "not slow"' in readme


def test_every_flower_and_real_data_test_is_slow_too(request):
    from conftest import REAL_DATA_FIXTURES

    items = request.session.items  # what this run collected (after -m deselected)
    for item in items:
        if REAL_DATA_FIXTURES & set(item.fixturenames):
            assert item.get_closest_marker("real_data"), item.nodeid
        if item.get_closest_marker("flower") or item.get_closest_marker("real_data"):
            assert item.get_closest_marker("slow"), item.nodeid
