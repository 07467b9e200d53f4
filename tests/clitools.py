"""Running the CLI in-process, and the contract every bad-input test checks."""

from __future__ import annotations

from typer.testing import CliRunner

from fedlora_cli.app import app

runner = CliRunner()


def run(*args, env: dict | None = None):
    """`fedlora <args>` in this process; arguments may be paths or numbers."""
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_error_line(result, code: int, pattern: str) -> str:
    """The contract for bad input: the exit code, one `error:` line saying what to do, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    flat = " ".join(result.stderr.split())
    assert pattern.lower() in flat.lower(), flat
    return flat
