"""The suite runs on the torch that `make test` pins (SO8T_TEST_TORCH_SPEC), not on whatever an earlier target left."""

from __future__ import annotations

import os

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from .conftest import IN_CI


def test_torch_is_the_pinned_build():
    spec = os.environ.get("SO8T_TEST_TORCH_SPEC")
    if not spec:
        message = "SO8T_TEST_TORCH_SPEC is not set: run the suite with `make test`, which pins torch"
        if IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    import torch
    requirement = Requirement(spec)
    installed = Version(torch.__version__)
    # The pin names a release (torch==2.13.0); the local label of the build (+cpu) does not count.
    assert requirement.name == "torch" and Version(installed.public) in requirement.specifier, (
        f"the tests run on torch {torch.__version__}, not on the pinned {spec}: the venv holds another torch "
        f"(run `make test`, which recreates it)"
    )
