"""The one base of every typed value: manifests, plans, host decisions and build records alike."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Frozen, unknown keys refused (a typo, or a hand-edited file, is an error), and no float field takes inf
    or nan: `.inf` or `1e400` in a timeout would validate and then crash or hang a run."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
