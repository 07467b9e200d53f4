"""Options declared once: the fields of the specs give every command's parameters, help panels, choices,
Tab completion, --config keys and types, the Flower run config and the resume rules."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from clitools import one_error_line, run
from typer.main import get_command
from typer.testing import CliRunner

from fedlora_cli.app import app
from fedlora_cli.config import (
    BaselineConfig,
    DataSpec,
    EvalConfig,
    MergeConfig,
    ModelSpec,
    RoundsConfig,
    ShardConfig,
    TrainConfig,
    TrainSpec,
)
from fedlora_cli.options import Spec, is_spec, option, option_of, walk

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"train": TrainConfig, "baseline": BaselineConfig, "eval": EvalConfig, "rounds": RoundsConfig,
           "shard": ShardConfig, "merge": MergeConfig}  # fmt: skip


def command(name: str):
    return get_command(app).commands[name]


def flags_of(name: str) -> dict[str, object]:
    return {o: p for p in command(name).params for o in getattr(p, "opts", ())}


def test_every_config_field_is_an_option_or_a_nested_spec():
    """No field escapes the declaration: each is an option (flag and help) or a nested spec of options."""
    for cls in CONFIGS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if option_of(f) is None:
                assert is_spec(hints[f.name]), (cls.__name__, f.name)
        for f in walk(cls):
            assert f.option.help.strip() and f.option.flag.startswith("--"), f.dotted


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_command_takes_exactly_its_configs_cli_options(name):
    flags = flags_of(name)
    skipped = {"eval": {"--max-train-samples"},
               "merge": {"--client-ranks", "--prox-mu", "--hetlora-gamma", "--hetlora-lambda"}}.get(name, set())  # fmt: skip
    for f in walk(CONFIGS[name]):
        if not f.option.cli or f.option.flag in skipped:
            continue
        wanted = "--local-epochs" if (name, f.dotted) == ("rounds", "train.epochs") else f.option.flag
        assert wanted in flags, (name, f.dotted)


def test_rounds_help_groups_options_in_panels_by_spec():
    result = CliRunner().invoke(app, ["rounds", "-h"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    titles = [line.split("─")[1].strip() for line in result.stdout.splitlines() if line.startswith("╭─")]
    for panel in ("Data", "Model", "LoRA", "Training", "Federation", "Method", "Privacy", "Engine", "Output"):
        assert panel in titles, titles
    assert titles.index("Data") < titles.index("Model") < titles.index("LoRA") < titles.index("Training")
    # an option sits in its spec's panel: --lora-r in LoRA, --dp-clip in Privacy
    panel_of = {}
    current = None
    for line in result.stdout.splitlines():
        if line.startswith("╭─"):
            current = line.split("─")[1].strip()
        for flag in ("--lora-r", "--dp-clip", "--engine", "--svd-rank", "--learning-rate"):
            if f" {flag} " in line or f" {flag}," in line:
                panel_of.setdefault(flag, current)
    assert panel_of == {"--lora-r": "LoRA", "--dp-clip": "Privacy", "--engine": "Engine", "--svd-rank": "Method",
                        "--learning-rate": "Training"}  # fmt: skip


CHOICES = [
    ("rounds", "--aggregation", {"svd", "naive", "hetlora", "exact", "ffa", "rolora", "fedsa", "local"}),
    ("rounds", "--partition", {"iid", "overlap", "category", "category_overlap", "dirichlet", "quantity"}),
    ("shard", "--mode", {"iid", "overlap", "category", "category_overlap", "dirichlet", "quantity"}),
    ("rounds", "--engine", {"local", "flower"}),
    ("rounds", "--precision", {"auto", "fp32", "bf16"}),
    ("train", "--precision", {"auto", "fp32", "bf16"}),
    ("eval", "--precision", {"auto", "fp32", "bf16"}),
    ("rounds", "--dp-where", {"server", "client"}),
    ("merge", "--aggregation", {"svd", "naive", "hetlora", "exact", "ffa", "rolora", "fedsa", "local"}),
    ("rounds", "--server-optimizer", {"avg", "momentum", "adam", "yogi", "adagrad"}),
    ("rounds", "--rank-scaling", {"fixed-scale", "fixed-alpha"}),
    ("rounds", "--server-rank", {"truncated", "full"}),
]


@pytest.mark.parametrize(("name", "flag", "choices"), CHOICES)
def test_every_choice_valued_option_completes_on_tab_and_refuses_others(name, flag, choices):
    cmd = command(name)
    param = flags_of(name)[flag]
    ctx = cmd.make_context(name, [], resilient_parsing=True)
    completed = {item.value for item in param.shell_complete(ctx, "")}
    assert completed == choices
    first = sorted(choices)[0]
    assert {item.value for item in param.shell_complete(ctx, first[:2])} >= {first}
    args = {
        "shard": ["--task", "sst2", "--clients", "2"],
        "merge": ["--adapters", "a", "--save-adapter", "b"],
    }
    one_error_line(run(name, *args.get(name, ["--task", "sst2"]), flag, "bogus"), 2, f"{flag} must be")


def test_open_choices_are_suggested_not_forced():
    cmd, param = command("train"), flags_of("train")["--device"]
    ctx = cmd.make_context("train", [], resilient_parsing=True)
    assert {i.value for i in param.shell_complete(ctx, "c")} == {"cpu", "cuda"}
    assert {i.value for i in flags_of("train")["--task"].shell_complete(ctx, "s")} == {"sst2", "stsb"}


def test_pyproject_run_config_is_generated_from_the_fields():
    pytest.importorskip("flwr")
    from fedlora_cli.flower import codec

    text = (ROOT / "pyproject.toml").read_text()
    block = codec.pyproject_block()
    assert block in text, "run `python -m fedlora_cli.flower.codec` and paste it into pyproject.toml"
    keys = {codec.run_config_key(f.path) for f in walk(RoundsConfig)}
    assert "aggregation.svd.rank" in keys and "train.learning-rate" in keys
    assert set(codec.default_run_config()) == keys


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("rounds = [1, 2]", "rounds = [1, 2]: give one value, not a list"),
        ("[[rounds]]\nx = 1", "rounds = [{'x': 1}]: give one value"),
        ("eval-each-round = 0", "eval-each-round = 0: must be true or false"),
        ("rounds = 2.5", "rounds = 2.5: must be a whole number"),
        ("rounds = true", "rounds = True: must be a whole number"),
        ('learning-rate = "fast"', "learning-rate = 'fast': must be a number"),
        ('aggregation = "median"', "aggregation = 'median': must be one of svd, naive"),
        ('target-modules = ["query", 3]', "target-modules = ['query', 3]: must be a text"),
    ],
)
def test_config_file_values_must_have_the_options_type(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    result = run("rounds", "--task", "sst2", "--shards", tmp_path, "--config", path)
    one_error_line(result, 2, message)


def test_config_file_takes_every_option_under_its_long_name(tmp_path):
    """The --config keys are the flags: a value for each option of `rounds` is accepted as written."""
    import typer

    from fedlora_cli.commands import _common as c

    cmd = command("rounds")
    options = {}
    for f in walk(RoundsConfig):
        if f.option.cli and f.default not in (None, "") and f.option.flag != "--model":
            key = "local-epochs" if f.dotted == "train.epochs" else f.option.key
            options[key] = list(f.default) if isinstance(f.default, tuple) else f.default
    defaults = c.options_to_defaults(cmd, options, "test")
    assert len(defaults) == len(options)
    assert typer  # the CLI layer is the one reading it


# a config with one option more than any command has (test_a_new_option_is_one_field)
def _below_one(flag, value):
    if not value < 1:
        raise ValueError(f"{flag} must be < 1, got {value}")


@dataclass(frozen=True)
class ToyExtra(Spec):
    panel: ClassVar[str] = "Extra"

    warmth: float = option(0.5, "--warmth", help="how warm", check=lambda flag, v: _below_one(flag, v))


@dataclass(frozen=True)
class Toy(Spec):
    data: DataSpec
    extra: ToyExtra = field(default_factory=ToyExtra)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=2.0))


def test_a_new_option_is_one_field(tmp_path):
    """A spec with one more field: the command gets the option (help, panel, check), --config takes it,
    and the config is built with it by keyword — nothing else is written."""
    import typer

    from fedlora_cli.commands import _common as c

    seen = {}

    def body(ctx, values):
        seen["config"] = values.config(Toy)

    toy = typer.Typer(cls=c.FedloraGroup)
    toy.command("toy", cls=c.FedloraCommand)(c.Command(Toy).wrap(body))
    toy.command("other")(lambda: None)
    runner = CliRunner()
    assert runner.invoke(toy, ["toy", "--task", "rte", "--warmth", "0.25"]).exit_code == 0
    assert (
        seen["config"].extra.warmth == 0.25 and seen["config"].train.epochs == 2.0
    )  # the parent's default kept
    help_text = runner.invoke(toy, ["toy", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--warmth" in help_text and "how warm" in help_text and "Extra" in help_text
    config = tmp_path / "toy.toml"
    config.write_text("warmth = 0.75\nlearning-rate = 0.01\n")
    assert runner.invoke(toy, ["toy", "--task", "rte", "--config", str(config)]).exit_code == 0
    assert seen["config"].extra.warmth == 0.75 and seen["config"].train.learning_rate == 0.01
    bad = runner.invoke(toy, ["toy", "--task", "rte", "--warmth", "3"])
    assert bad.exit_code == 2 and "--warmth must be < 1, got 3.0" in " ".join(bad.stderr.split())


def test_given_options_build_the_config_by_keyword_and_the_rest_are_the_configs_defaults(monkeypatch):
    import fedlora_cli.centralised as centralised

    seen = {}
    monkeypatch.setattr(
        centralised, "run_baseline", lambda config, **_: seen.setdefault("c", config) and 1 / 0
    )
    run("baseline", "--task", "sst2", "--epochs", "2")
    config = seen["c"]
    assert config.train.learning_rate == 2e-5 and config.train.epochs == 2.0  # baseline's own default kept
    assert config.model == ModelSpec()


def test_packaged_model_resolves_without_the_hub(tmp_path, monkeypatch):
    """`--model org/Name` of a model a package carries (gt_<name>/model/) resolves to that folder, and the
    run folder is named after the model, not after `model/`."""
    package = tmp_path / "site" / "gt_tiny_thing_v2"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = ModelSpec("some-org/Tiny-Thing-v2")
    assert spec.resolved == str(package / "model")
    assert spec.short_name == "Tiny-Thing-v2"
    assert ModelSpec(str(package / "model")).short_name == "gt_tiny_thing_v2"
    assert ModelSpec("some-org/not-installed").resolved == "some-org/not-installed"
    assert ModelSpec("roberta-base").resolved == "FacebookAI/roberta-base"


def test_pyproject_config_block_parses_and_covers_every_field():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["tool"]["flwr"]["app"]["config"]["aggregation"]["svd"]["rank"] == ""
