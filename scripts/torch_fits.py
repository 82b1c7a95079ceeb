"""Does this environment's torch fit a requirement? What `make` asks before it reuses .venv.

    python scripts/torch_fits.py SPEC          e.g. torch==2.13.0, or torch (any version fits)

Exit 0 when the installed torch satisfies SPEC (a local label such as +cpu does not count, as in pip) or when no
torch is installed yet (the install that follows puts SPEC there); exit 1, saying what is installed, otherwise.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

try:
    from packaging.requirements import Requirement
except ImportError:  # a venv that holds only pip so far
    from pip._vendor.packaging.requirements import Requirement


def fits(spec: str) -> tuple[bool, str]:
    requirement = Requirement(spec)
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        return True, ""
    return requirement.specifier.contains(installed, prereleases=True), installed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    ok, installed = fits(argv[0])
    if not ok:
        print(f"{sys.prefix} holds torch {installed}, not {argv[0]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
