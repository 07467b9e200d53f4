"""MkDocs hook: the CLI reference page, generated from the code at every build so it cannot go stale.

It imports `fedlora_cli.app`, walks the click command tree that Typer builds from it and writes each
command's usage, help and parameters (flags, type or choices, default, help) into `reference/cli.md`.
Only click's public attributes are read, by duck typing (`params`, `opts`, `type`, `default` …; no
`import click`, which may not be the Click that Typer bundles), so the page keeps working however the
options are declared. It also checks that every relative link in README.md points
at a file that exists (and, into a docs page, at a heading that exists), so moving or renaming a docs
page cannot silently break the README.
"""

from __future__ import annotations

import enum
import html
import re
import sys
import warnings
from pathlib import Path
from typing import Any

PAGE = "reference/cli.md"
DEFAULT_PANEL = "Options"


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    root = Path(config.config_file_path).resolve().parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # a checkout that is not pip-installed still builds
    _check_readme_files(root)
    with warnings.catch_warnings():  # click's deprecations of what Typer < 0.21 imports: not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        content = render()
    files.append(File.generated(config, PAGE, content=content))
    return files


def on_page_content(html_text: str, page: Any, config: Any, files: Any) -> str:
    _ANCHORS[page.file.src_uri] = set(re.findall(r'id="([^"]+)"', html_text))
    return html_text


def on_post_build(config: Any) -> None:
    _check_readme_anchors(Path(config.config_file_path).resolve().parent, Path(config.docs_dir).resolve())


# ---------------------------------------------------------------------------------------------------
# the page


def render() -> str:
    import typer.main

    from fedlora_cli.app import app

    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the code when the site is built (`docs/hooks/cli_reference.py` walks the click "
        "command tree that Typer builds from `fedlora_cli.app`), so it always matches the installed "
        "`fedlora -h`. Every command also takes the reference scripts' flag names "
        "(`--task_name`, `--lora_r` …, see [From the reference scripts](../guide/reference-scripts.md)) "
        "and `--config FILE.toml` (see [Options and config files](../guide/options.md)).",
        "",
    ]
    for path, command, ctx in _walk(root, ["fedlora"]):
        lines += _command_section(path, command, ctx)
    return "\n".join(lines) + "\n"


def _walk(command: Any, path: list[str], parent: Any = None) -> list[tuple[list[str], Any, Any]]:
    """(path, command, its click context) for the command and every visible command below it, in registry order."""
    ctx = _context(command, path[-1], parent)
    out = [(path, command, ctx)]
    if _is_group(command):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                out += _walk(sub, [*path, name], ctx)
    return out


def _command_section(path: list[str], command: Any, ctx: Any) -> list[str]:
    name = " ".join(path)
    level = "#" * min(len(path) + 1, 4)
    usage = " ".join([*path, *command.collect_usage_pieces(ctx)])
    lines = [f"{level} `{name}`", "", "```text", f"Usage: {usage}", "```", ""]
    if command.help:
        lines += [_paragraphs(command.help), ""]
    if _is_group(command):
        subs = [(n, command.get_command(ctx, n)) for n in command.list_commands(ctx)]
        rows = [(f"`{name} {n}`", _first_line(s)) for n, s in subs if s is not None and not s.hidden]
        if rows:
            lines += ["| command | what it does |", "| --- | --- |"]
            lines += [f"| {a} | {b} |" for a, b in rows]
            lines.append("")
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    arguments = [p for p in params if p.param_type_name == "argument"]
    if arguments:
        lines += ["**Arguments**", "", "| argument | type | required | help |", "| --- | --- | --- | --- |"]
        for p in arguments:
            meta = p.make_metavar(ctx) if _takes_ctx(p.make_metavar) else p.make_metavar()
            lines.append(
                f"| `{meta}` | {_type(p)} | {'yes' if p.required else 'no'} | {_cell(getattr(p, 'help', '') or '')} |"
            )
        lines.append("")
    panels: dict[str, list[Any]] = {}
    for p in params:
        if p.param_type_name == "option":
            panels.setdefault(getattr(p, "rich_help_panel", None) or DEFAULT_PANEL, []).append(p)
    for panel, options in panels.items():
        lines += [
            f"**{_cell(panel)}**",
            "",
            "| option | type | default | help |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {_flags(p)} | {_type(p)} | {_default(p)} | {_cell(p.help or '')} |" for p in options]
        lines.append("")
    return lines


def _context(command: Any, name: str, parent: Any = None) -> Any:
    return command.context_class(command, info_name=name, parent=parent, **(command.context_settings or {}))


def _is_group(command: Any) -> bool:
    return hasattr(command, "list_commands")


def _takes_ctx(fn: Any) -> bool:
    import inspect

    return "ctx" in inspect.signature(fn).parameters


def _first_line(command: Any) -> str:
    text = command.short_help or command.help or ""
    return _cell(_plain(text).strip().split("\n\n")[0].replace("\n", " "))


def _flags(p: Any) -> str:
    flags = ", ".join(f"`{o}`" for o in p.opts)
    if p.secondary_opts:
        flags += " / " + ", ".join(f"`{o}`" for o in p.secondary_opts)
    return flags


def _type(p: Any) -> str:
    t = p.type
    if getattr(t, "choices", None) is not None:
        return " \\| ".join(f"`{_choice(c)}`" for c in t.choices)
    if getattr(p, "is_flag", False) and not getattr(p, "count", False):
        return "flag"
    name = getattr(t, "name", None) or type(t).__name__
    text = f"{name}".upper() if name in {"text", "integer", "float", "boolean"} else str(name)
    if hasattr(t, "_describe_range"):  # IntRange / FloatRange: show the bounds
        text += f" {t._describe_range()}"
    if getattr(p, "multiple", False) or (getattr(p, "nargs", 1) or 1) != 1:
        text += ", repeatable" if getattr(p, "multiple", False) else f", {p.nargs} values"
    if getattr(p, "count", False):
        text = "count"
    return _cell(text)


def _choice(value: Any) -> str:
    return str(value.value if isinstance(value, enum.Enum) else value)


def _default(p: Any) -> str:
    if getattr(p, "required", False):
        return "required"
    default = p.default
    if callable(default):
        return "(computed)"
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, list | tuple):
        default = ", ".join(_choice(d) for d in default)
    if default in (None, "") or not isinstance(default, str | int | float | bool | Path):
        return ""  # unset, or click's own sentinel for "no default"
    if getattr(p, "is_flag", False) and isinstance(default, bool):
        if p.secondary_opts:
            return f"`{p.opts[0] if default else p.secondary_opts[0]}`"
        return "on" if default else "off"
    return f"`{_choice(default)}`"


# Rich markup in help strings ([bold], \[default: …]) becomes plain text; the rest is escaped so that
# `client_<i>.json` or `a | b` survive Markdown tables.
def _plain(text: str) -> str:
    from rich.text import Text

    try:
        return Text.from_markup(text).plain
    except Exception:  # not valid markup: keep the text as written
        return text


def _cell(text: str) -> str:
    text = _plain(text).replace("\b\n", "").strip()
    text = re.sub(r"\s*\n\s*", " ", text)
    # code spans (`fedlora shard`) stay as written; only a table's `|` needs escaping inside them
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p.replace("|", "\\|") if p.startswith("`") else _escape(p) for p in parts)


def _escape(text: str) -> str:
    text = html.escape(text, quote=False)
    for ch in ("\\", "|", "*", "_", "[", "]", "`"):
        text = text.replace(ch, "\\" + ch)
    return text


def _paragraphs(text: str) -> str:
    parts = [p for p in _plain(text).replace("\b\n", "").split("\n\n") if p.strip()]
    return "\n\n".join(_cell(p) for p in parts)


# ---------------------------------------------------------------------------------------------------
# README links

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_ANCHORS: dict[str, set[str]] = {}  # docs page (src_uri) -> the ids of its rendered headings


def _readme_links(root: Path) -> list[str]:
    readme = root / "README.md"
    if not readme.is_file():
        return []
    links = _LINK.findall(readme.read_text(encoding="utf-8"))
    # URLs and the README's own anchors are not files of this checkout
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def readme_missing_files(root: Path) -> list[str]:
    """README links whose file does not exist in the checkout at `root`."""
    return [t for t in _readme_links(root) if not (root / t.split("#")[0]).exists()]


def _check_readme_files(root: Path) -> None:
    from mkdocs.exceptions import PluginError

    broken = readme_missing_files(root)
    if broken:
        raise PluginError(f"README.md links to files that do not exist: {', '.join(broken)}")


def _check_readme_anchors(root: Path, docs_dir: Path) -> None:
    from mkdocs.exceptions import PluginError

    broken = []
    for target in _readme_links(root):
        path, _, anchor = target.partition("#")
        try:
            page = (root / path).resolve().relative_to(docs_dir).as_posix()
        except ValueError:
            continue  # not a docs page
        if anchor and page in _ANCHORS and anchor not in _ANCHORS[page]:
            broken.append(target)
    if broken:
        raise PluginError(f"README.md links to headings that do not exist: {', '.join(broken)}")
