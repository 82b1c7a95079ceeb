"""The project's one error tree.

Library code raises only these; third-party exceptions are wrapped where they enter
(``raise AdapterError(...) from e``). The CLI is the single boundary that turns them
into one line on stderr and a documented exit code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_OPERATIONAL = 1
EXIT_INVALID_INPUT = 2
EXIT_DRIFT = 3  # plan --check: a host differs from the manifest; apply: a host or input changed since the plan
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: what was in flight was finished or undone


class So8tError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = EXIT_OPERATIONAL


class InvalidInputError(So8tError):
    """The user handed us something we will not work with; nothing was changed."""

    exit_code = EXIT_INVALID_INPUT


class ManifestError(InvalidInputError):
    """The manifest file is unreadable, malformed, or fails validation."""


class AdapterError(InvalidInputError):
    """An adapter directory does not match its format or the base model."""


class ModelError(InvalidInputError):
    """A model directory is incomplete, truncated, or of an unsupported architecture."""


class UsageError(InvalidInputError):
    """Command-line arguments that parse but make no sense together."""


class SettingError(UsageError):
    """A setting with a value we will not use, named as the library knows it (`dtype`, `outtype`); a command that
    takes it from a flag names the flag instead (cli.typer_app.flags)."""

    def __init__(self, setting: str, why: str):
        super().__init__(f"{setting}: {why}")
        self.setting, self.why = setting, why


class BuildError(So8tError):
    """Bake, convert or quantize failed for an operational reason."""


class VerifyError(So8tError):
    """A baked model does not reproduce the adapter model within tolerance."""


class HostError(So8tError):
    """An Ollama host is unreachable or answered with an error."""


class HostUnreachableError(HostError):
    """An Ollama host did not answer at all (refused, timed out, name not found)."""


class HostChangedError(HostError):
    """A host's models changed since the plan was made (someone else deployed): nothing was overwritten."""

    exit_code = EXIT_DRIFT


class RegistryError(So8tError):
    """The OCI registry is unreachable, refused a push, or answers in a way Ollama's puller cannot use."""


class SmokeTestError(So8tError):
    """A deployed variant failed its smoke test."""


class RolloutError(So8tError):
    """apply finished, but at least one host failed (the summary says which and why)."""


class DriftError(So8tError):
    """plan --check found hosts that differ from the manifest."""

    exit_code = EXIT_DRIFT


class Interrupted(So8tError):
    """Ctrl-C or SIGTERM: the run stopped after finishing or undoing what was in flight."""

    exit_code = EXIT_INTERRUPTED
