"""A command's Typer parameters, generated from the option fields of its config (fedlora_cli/options.py).

`Command(RoundsConfig, ...)` walks the config's specs and makes one Typer option per field — flag, help,
type, choices (a click Choice: shown in `-h`, completed on Tab, refused with the field's own message),
default and help panel all read from the field — plus the few options that belong to the terminal
only (`Extra`: --log-every, --report-to, --model-size …). `Command.wrap(body)` gives Typer a function
whose signature is those parameters; the body receives the values and builds its config by keyword
(`Values.config`) from the options the user actually gave (command line or --config), so every
default comes from the config itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from typer.core import click  # the Click that Typer itself uses

from fedlora_cli.errors import InputError
from fedlora_cli.options import MISSING, OptionField, build, walk

# Help panels in the order `-h` shows them (others follow in the order they first appear).
PANELS = (
    "Data",
    "Model",
    "LoRA",
    "Training",
    "Sharding",
    "Federation",
    "Method",
    "Server optimizer",
    "Privacy",
    "Robustness",
    "Engine",
    "Evaluation",
    "Merge",
    "Output",
)


MAX_CHOICES_WIDTH = 20  # longer choice lists are named in the help text, not in the metavar column


class SpecChoice(click.Choice):
    """A closed set of values: shown as [a|b|c] in `-h`, completed on Tab; a bad value gets the field's
    message."""

    def __init__(self, choices: Sequence[str], flag: str, check: Callable[[str, Any], None] | None) -> None:
        super().__init__(list(choices))
        self.flag, self.check = flag, check

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value in self.choices:
            return value
        message = f"{self.flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if self.check is not None:
            try:
                self.check(self.flag, value)
            except ValueError as e:
                message = str(e)
        raise OptionError(message, ctx=ctx, param=param)


class OptionError(click.BadParameter):
    """A bad value whose message already names the option (printed as it is, on one line)."""


@dataclass(frozen=True)
class Rename:
    """The same field under another flag, help or set of choices in one command (rounds' --local-epochs is
    --epochs; its --lr-schedule offers the schedules of rounds)."""

    flags: tuple[str, ...] | None = None
    help: str | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Extra:
    """An option of the terminal, not of the config (--log-every, --report-to, --resume RUN …)."""

    name: str
    annotation: Any  # Annotated[T, typer.Option(...)]
    default: Any = None
    # Turn the given value into config values: (value, {path: value} given so far) -> {path: value}
    apply: Callable[[Any, dict[tuple[str, ...], Any]], dict[tuple[str, ...], Any]] | None = None


@dataclass
class Values:
    """What a command was given: config values by path (only those the user set) and the terminal's extras."""

    given: dict[tuple[str, ...], Any]
    extra: dict[str, Any]
    fields: dict[tuple[str, ...], OptionField] = field(default_factory=dict)

    def config(self, cls: type, **fixed: Any) -> Any:
        """The config, built by keyword from the given options and `fixed` ({"data.task": …}); a bad value
        is one usage-error line (exit 2)."""
        values = {**self.given, **{tuple(k.split(".")): v for k, v in fixed.items()}}
        try:
            return build(cls, values)
        except ValueError as e:
            raise InputError(str(e)) from None

    def get(self, dotted: str, default: Any = None) -> Any:
        return self.given.get(tuple(dotted.split(".")), default)


@dataclass
class _Param:
    name: str
    annotation: Any
    default: Any
    panel: str
    path: tuple[str, ...] | None  # None: an Extra


class Command:
    """The options of one command: its config's fields (minus `skip`, with `rename`) and `extras`."""

    def __init__(
        self,
        config: type,
        *,
        skip: Iterable[str] = (),
        rename: dict[str, Rename] | None = None,
        required: Iterable[str] = (),
        extras: Sequence[Extra] = (),
        defaults: Any = MISSING,
    ) -> None:
        self.config_class = config
        skip, rename, required = set(skip), rename or {}, set(required)
        self.fields = {
            f.path: f for f in walk(config, defaults=defaults) if f.option.cli and f.dotted not in skip
        }
        self.extras = list(extras)
        params = [_field_param(f, rename.get(f.dotted), f.dotted in required) for f in self.fields.values()]
        params += [
            _Param(e.name, e.annotation, e.default, _panel_of(e.annotation), None) for e in self.extras
        ]
        order = {p: i for i, p in enumerate(PANELS)}
        self.params = sorted(params, key=lambda p: order.get(p.panel, len(PANELS)))  # stable within a panel
        self.paths = {p.name: p.path for p in self.params}

    def wrap(self, body: Callable[[Any, Values], Any]) -> Callable[..., Any]:
        """A function Typer can register: its signature is the generated parameters, its body
        `body(ctx, values)`."""

        def command(ctx: typer.Context, **kwargs: Any) -> Any:
            return body(ctx, self.values(ctx, kwargs))

        signature = [
            inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        ]
        signature += [
            inspect.Parameter(
                p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=p.annotation
            )
            for p in self.params
        ]
        command.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
        command.__annotations__ = {}
        command.__name__ = body.__name__.lstrip("_")
        command.__doc__ = body.__doc__
        command.__module__ = body.__module__
        return command

    def values(self, ctx: Any, kwargs: dict[str, Any]) -> Values:
        given: dict[tuple[str, ...], Any] = {}
        extra: dict[str, Any] = {}
        for name, value in kwargs.items():
            path = self.paths.get(name)
            if path is None:
                extra[name] = value
            elif _given(ctx, name):
                given[path] = _to_config(value)
        for e in self.extras:
            if e.apply is not None and extra.get(e.name) is not None:
                given.update(e.apply(extra[e.name], given))
        return Values(given, extra, self.fields)


def _given(ctx: Any, name: str) -> bool:
    """Set on the command line or by --config (click's DEFAULT_MAP), not left at its default."""
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is not None and source.name != "DEFAULT"


def _to_config(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _panel_of(annotation: Any) -> str:
    for meta in getattr(annotation, "__metadata__", ()):
        panel = getattr(meta, "rich_help_panel", None)
        if panel:
            return panel
    return "Options"


def _field_param(f: OptionField, rename: Rename | None, required: bool) -> _Param:
    opt = f.option
    flags = rename.flags if rename is not None and rename.flags else opt.flags
    help_text = (rename.help if rename is not None and rename.help else opt.help) or ""
    base, optional_, many = _python_type(f.type)
    default = f.default
    kwargs: dict[str, Any] = {"help": _escape(help_text), "rich_help_panel": f.panel, "hidden": opt.hidden}
    if opt.metavar:
        kwargs["metavar"] = opt.metavar
    choices = rename.choices if rename is not None and rename.choices else opt.choice_values()
    if choices is not None:
        kwargs["click_type"] = SpecChoice(choices, opt.flag, opt.check)
        if len("|".join(choices)) > MAX_CHOICES_WIDTH:  # a long [a|b|…] would squeeze the help's columns
            kwargs["metavar"] = opt.metavar or "NAME"
            if not all(c in help_text for c in choices):
                kwargs["help"] = _escape(f"{help_text} (one of: {', '.join(choices)})")
    elif opt.suggest:
        suggestions = tuple(opt.suggest)
        kwargs["autocompletion"] = lambda incomplete: [s for s in suggestions if s.startswith(incomplete)]
    if base is bool:
        decls = [f"{flags[0]}/--no-{flags[0].removeprefix('--')}"] if opt.negatable else [flags[0]]
        decls += list(flags[1:])
        annotation_type: Any = bool
    else:
        decls = list(flags)
        annotation_type = (
            list[base] | None if many else (base | None if optional_ or default is None else base)
        )
    if many:
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else None
        default = None
        if shown and not opt.default_text:
            kwargs["show_default"] = shown
    if opt.default_text:
        kwargs["show_default"] = opt.default_text
    elif default is None or default == "":
        kwargs["show_default"] = False
    if required:
        default = ...
        kwargs["show_default"] = False
    annotation = Annotated[annotation_type, typer.Option(*decls, **kwargs)]
    return _Param("__".join(f.path), annotation, default, f.panel, f.path)


def _python_type(tp: Any) -> tuple[type, bool, bool]:
    """(base type, may be None, several values) of a field annotation such as `tuple[str, ...] | None`."""
    import types
    import typing

    args = typing.get_args(tp)
    optional_ = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        optional_ = type(None) in args
        inner = [a for a in args if a is not type(None)]
        tp = inner[0]
        args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return args[0], optional_, True
    return tp, optional_, False


def _escape(text: str) -> str:
    """Rich markup: `[plot]` in `fedlora[plot]` is text, not a style."""
    return text.replace("[", "\\[")
