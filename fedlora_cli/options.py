"""Options declared once: each is a field of a frozen spec that carries its flag, help, choices and check.

`option(default, "--flag", help=...)` makes a dataclass field whose metadata is an `Option`. From these
fields, and nothing else, come: the Typer parameters of every command that takes the spec
(commands/_options.py), the `--config` TOML keys (the long flag names), the Flower run-config keys (the
config path, flower/codec.py), which options a `rounds --resume` may change, and the checks run when a spec
is built (`Spec.__post_init__`). A new option is one field. Nothing here imports typer or torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

SEED_MAX = 2**32 - 1  # numpy's legacy seeding and most tools take 32-bit seeds
MAX_COUNT = 2**31 - 1  # batch sizes, ranks, lengths: what numpy and torch index with

Check = Callable[[str, Any], None]  # (the flag, the value) -> None, or ValueError naming both


@dataclass(frozen=True)
class Option:
    """How one spec field appears as an option. The first of `flags` is the option's name."""

    flags: tuple[str, ...]
    help: str
    check: Check | None = None  # run on every build of the spec (the CLI, --config, run.json, Flower)
    convert: Callable[[Any], Any] | None = None  # normalise the value before the check (e.g. a task alias)
    choices: Callable[[], Sequence[str]] | Sequence[str] | None = None  # a closed set: an Enum on the CLI
    suggest: Sequence[str] = ()  # an open set: completed on Tab, other values allowed (--device cuda:1)
    panel: str | None = None  # help panel; default: the spec's own
    default_text: str | None = None  # what `-h` shows as the default when the value itself says little
    negatable: bool = True  # a bool: --x/--no-x; False: a switch that only turns it on
    hidden: bool = False
    resume_free: bool = False  # `rounds --resume` may change it: how the work runs, not what it computes
    cli: bool = True  # False: recorded in the config, but no command takes it as an option
    metavar: str | None = None
    # A file or folder of the user's (True), or a value that is one when the predicate says so (--model is a
    # folder only when it exists): made absolute against the user's folder before any engine runs.
    path: bool | Callable[[Any], bool] = False

    @property
    def flag(self) -> str:
        return self.flags[0]

    @property
    def key(self) -> str:
        """The --config TOML key: the long flag without dashes."""
        return self.flag.removeprefix("--")

    def choice_values(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)


def option(
    default: Any = MISSING,
    *flags: str,
    help: str,
    default_factory: Any = MISSING,
    compare: bool = True,
    **kw: Any,
) -> Any:
    """A dataclass field that is an option: `lr: float = option(5e-4, "--learning-rate", "--lr", help=...)`.
    `compare=False`: a setting that does not make two specs different (how a fresh adapter is initialised)."""
    meta = {"option": Option(tuple(flags), help, **kw)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta, compare=compare)
    return field(default=default, metadata=meta, compare=compare)


def option_of(f: dataclasses.Field) -> Option | None:
    return f.metadata.get("option")


class Spec:
    """Base of the frozen option specs: each field's `convert` and `check`, then the spec's own `validate`.

    Every way a spec is built — the CLI, a --config file, a run.json, a Flower run config, Python —
    runs the same checks, so a bad value is refused with the same message wherever it comes from.
    """

    panel: ClassVar[str] = "Options"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            opt = option_of(f)
            if opt is None:
                continue
            value = getattr(self, f.name)
            if opt.convert is not None:
                value = opt.convert(value)
                object.__setattr__(self, f.name, value)
            if opt.check is not None:
                opt.check(opt.flag, value)
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields (override)."""


def is_spec(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Spec)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def spec_default(f: dataclasses.Field) -> Any:
    """A field's default value (MISSING when it has none)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@dataclass(frozen=True)
class OptionField:
    """One option of a config, wherever it sits in the tree of specs."""

    path: tuple[str, ...]  # ("train", "learning_rate")
    option: Option
    type: Any  # the field's annotation (int, float | None, tuple[str, ...] …)
    default: Any  # the config's default for it (a nested spec's default comes from its parent's factory)
    spec: type  # the spec class that declares it

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def panel(self) -> str:
        return self.option.panel or self.spec.panel


def walk(cls: type, prefix: tuple[str, ...] = (), defaults: Any = MISSING) -> Iterator[OptionField]:
    """Every option field of a config class, depth first in declaration order.

    `defaults` is an instance whose values are the defaults (a parent's default_factory, e.g. the
    TrainSpec of `rounds` with one local epoch); without it, each field's own default.
    """
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        own = getattr(defaults, f.name) if defaults is not MISSING else spec_default(f)
        nested = _nested_spec(tp)
        if nested is not None:
            yield from walk(nested, (*prefix, f.name), own)
            continue
        opt = option_of(f)
        if opt is not None:
            yield OptionField((*prefix, f.name), opt, tp, own, cls)


def _nested_spec(tp: Any) -> type | None:
    return tp if is_spec(tp) else None


def build(cls: type, values: dict[tuple[str, ...], Any], base: Any = MISSING) -> Any:
    """Build a config by keyword from {path: value}; fields not given keep their defaults.

    A nested spec is built only when one of its fields is given, from its parent's default for it
    (`dataclasses.replace`), so `rounds` keeps its one local epoch when only the learning rate is given.
    """
    hints = field_types(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nested = _nested_spec(hints[f.name])
        if nested is None:
            if (f.name,) in values:
                kwargs[f.name] = values[(f.name,)]
            continue
        inner = {path[1:]: v for path, v in values.items() if path[0] == f.name and len(path) > 1}
        if inner:
            default = getattr(base, f.name) if base is not MISSING else spec_default(f)
            kwargs[f.name] = build(nested, inner, default)
    if base is not MISSING:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def absolute_paths(config: Any, cwd: str | None = None) -> Any:
    """`config` with every path field (Option.path) absolute — `~` expanded, `..` folded, links kept as named
    — against `cwd` (default: this process's working directory): what the user meant, wherever an engine,
    a process or a thread later runs. Values that are not set ("" or None) stay as they are."""
    import os

    base = cwd or os.getcwd()
    values: dict[tuple[str, ...], Any] = {}
    for f in walk(type(config)):
        value: Any = config
        for part in f.path:
            value = getattr(value, part)
        kind = f.option.path
        if not value or not kind or (callable(kind) and not kind(value)):
            continue
        values[f.path] = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
    return build(type(config), values, config) if values else config


# ---------------------------------------------------------------------------------------------------
# checks: each returns a Check whose message names the flag and the value


def finite(x: Any) -> bool:
    """A real number that is neither NaN nor infinite (bool is not a number here)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def integer(low: int, high: int = MAX_COUNT) -> Check:
    def check(flag: str, x: Any) -> None:
        ok = isinstance(x, int) and not isinstance(x, bool) and low <= x <= high
        if not ok:
            raise ValueError(f"{flag} must be an integer in {low}..{high:,}, got {x}")

    return check


def number(low: float, high: float = math.inf, *, low_open: bool = False) -> Check:
    """Finite and in [low, high] (or (low, high] with `low_open`)."""

    def check(flag: str, x: Any) -> None:
        ok = finite(x) and (x > low if low_open else x >= low) and x <= high
        if not ok:
            bound = f"> {low:g}" if low_open else f">= {low:g}"
            if high != math.inf:
                bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise ValueError(f"{flag} must be a finite number {bound}, got {x}")

    return check


def half_open(low: float, high: float) -> Check:
    """In [low, high) — a share or a probability that may be 0 but not 1."""

    def check(flag: str, x: Any) -> None:
        if not (finite(x) and low <= x < high):
            raise ValueError(f"{flag} must be in [{low:g}, {high:g}), got {x}")

    return check


def at_least(low: int) -> Check:
    """A count of at least `low` (the short message the shard and rank options have always given)."""

    def check(flag: str, x: Any) -> None:
        if not (isinstance(x, int) and not isinstance(x, bool) and x >= low):
            raise ValueError(f"{flag} must be >= {low}, got {x}")

    return check


def optional(inner: Check) -> Check:
    """None (not set) passes; anything else must pass `inner`."""

    def check(flag: str, x: Any) -> None:
        if x is not None:
            inner(flag, x)

    return check


def one_of(choices: Callable[[], Sequence[str]] | Sequence[str], *, word: str = "one of") -> Check:
    def check(flag: str, x: Any) -> None:
        names = tuple(choices() if callable(choices) else choices)
        if x not in names:
            raise ValueError(f"{flag} must be {word} {', '.join(names)}, got {x!r}")

    return check


def every(*checks: Check) -> Check:
    def check(flag: str, x: Any) -> None:
        for c in checks:
            c(flag, x)

    return check


seed = integer(0, SEED_MAX)
