"""Project hygiene: the README's first lines are what CI runs; the package metadata is installable as declared."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block is not None and readme.index("```bash") < readme.index("## "), "the README must open with it"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def readme_extras() -> set[str]:
    install = next(c for c in readme_commands() if c.startswith("pip install -e"))
    return set(re.search(r'"\.\[([^\]]*)\]"', install).group(1).split(","))


def test_readme_opens_with_install_a_first_experiment_and_the_tests_as_ci_runs_them():
    commands = readme_commands()
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in commands[0]
    assert (
        "CPU" in (ROOT / "README.md").read_text().splitlines()[3]
    )  # the CPU build is said to be for CPU-only
    assert commands[1].startswith("pip install -e")
    assert any(c.startswith("fedlora ") for c in commands)  # one command that runs a first experiment
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[-1] == "python -m pytest -q" and commands[-1] in ci
    assert ci.index('pip install --quiet "torch==2.13.0"') < ci.index("pip install --quiet -e")
    ci_extras = set(re.search(r'-e "\.\[([^\]]*)\]"', ci).group(1).split(","))
    assert readme_extras() == ci_extras == set(PYPROJECT["project"]["optional-dependencies"])


def _closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution the requirements pull in (as installed here), following requested extras."""
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    stack = [(r, "") for r in requirements]
    while stack:
        req, _ = stack.pop()
        name = canonicalize_name(req.name)
        for extra in sorted(req.extras) or [""]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            names.add(name)
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            for line in requires:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    stack.append((sub, extra))
    return names


def test_a_fresh_clone_skips_no_test_for_lack_of_an_extra_the_readme_installs():
    """Every optional module a test imports-or-skips comes with the README's install line."""
    project = PYPROJECT["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in readme_extras():
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    installed = _closure(wanted)
    providers = metadata.packages_distributions()
    optional = set()
    for test in (ROOT / "tests").glob("test_*.py"):
        optional |= set(re.findall(r'importorskip\("(\w+)"', test.read_text()))
    assert optional >= {"flwr", "matplotlib"}
    for module in sorted(optional):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists & installed, (
            f"tests need {module}, which `pip install -e .[{','.join(readme_extras())}]` lacks"
        )


def test_every_requirement_accepts_every_python_the_project_declares():
    """`flwr run .` installs the app's dependencies with `uv sync`, which resolves for the whole declared
    Python range: a dependency that needs a newer Python than `requires-python` allows (flwr needs 3.11)
    fails that step. Checked with the metadata of the versions installed here, no network needed."""
    project = PYPROJECT["project"]
    declared = SpecifierSet(project["requires-python"])
    pythons = [f"3.{minor}" for minor in range(0, 40) if declared.contains(f"3.{minor}")]
    assert pythons[0] == "3.11"
    lowest = pythons[0].replace(".", "")
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{lowest}"
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    for name in sorted(_closure(requirements)):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a dependency of a platform or Python this machine is not (its marker is false here)
        needs = SpecifierSet(dist.metadata.get("Requires-Python") or "")
        refused = [v for v in pythons if not needs.contains(v)]
        # an upper bound (flwr: <4.0) is fine; what breaks resolution is a floor above ours
        assert not refused or refused[0] != pythons[0], f"{name} {dist.version} needs Python {needs}"
    for req in requirements:
        version = metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req} but {version} is installed"


def test_torch_is_not_pinned_to_one_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+"', pyproject) and "torch==" not in pyproject
