"""Shared fixtures: an in-process CLI runner and tiny models built on the spot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from so8t_deploy.cli import main

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Run `so8t-deploy ARGS...` in-process through the real entry point and error boundary."""

    def run(*args: object) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
