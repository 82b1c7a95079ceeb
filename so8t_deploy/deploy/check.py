"""What can be checked about a manifest's local inputs without a network, before anything is built.

Existence and readability always; with the ML stack installed, everything a bake would check
before writing a byte: the model's shards and headers, each adapter's format, shapes and base
model, for every variant's scales. A control machine without torch (one that drives a
`backend: docker` worker) leaves the deep checks to the worker, and says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..build.check import check_readable
from ..errors import ModelError
from ..manifest.schema import Manifest


def check_local_inputs(manifest: Manifest) -> list[str]:
    """Check everything knowable offline; returns notes about what could not be checked here."""
    check_readable(manifest)
    notes = check_chat(manifest) + check_calibration(manifest)
    if importlib.util.find_spec("torch") is None:
        return [*notes, "the ML stack (torch) is not installed here: model and adapter formats are checked by the "
                "worker"]
    from ..bake.adapters import AdapterSpec, load_adapter
    from ..bake.bake import prepare_bake

    specs = [AdapterSpec(a.kind, a.path, a.allow_base_mismatch) for a in manifest.source.adapters]
    if not manifest.source.is_local:
        for spec in specs:
            load_adapter(spec.path, spec.kind)
        return [*notes, f"source.model {manifest.source.model!r} is a hub model: it is checked once downloaded"]
    for scales in dict.fromkeys(manifest.bake.variants.values()):
        prepare_bake(Path(manifest.source.model), specs, scales)
    return notes


def check_calibration(manifest: Manifest) -> list[str]:
    """quantize.imatrix's data can be read (and chat data rendered by the model's template, for a local model)."""
    imatrix = manifest.quantize.imatrix
    if imatrix is None:
        return []
    from ..build.calibration import check_held_out, eval_text, load_calibration

    chat_dir = Path(manifest.source.model) if manifest.source.is_local else None
    calibration = load_calibration(imatrix, chat_dir)
    if calibration is None:
        return ["quantize.imatrix.chat is rendered by the model's chat template once the hub model's files are here"]
    check_held_out(eval_text(manifest), calibration)
    return []


def source_family(manifest: Manifest) -> str | None:
    """The local source model's family as the bake recognises it, e.g. "Gemma 2 (gemma2)"; None for a hub model.

    Reads config.json only (no ML stack), so a control machine names the family too."""
    if not manifest.source.is_local:
        return None
    from ..bake.layout import layout_from_config
    from ..jsonfile import read_json_object

    config = Path(manifest.source.model) / "config.json"
    return layout_from_config(read_json_object(config, ModelError), str(config)).family


def check_chat(manifest: Manifest) -> list[str]:
    """The chat template against the model's own (chat.setup), where the model is local; notes what it chose."""
    from ..chat.setup import resolve_chat
    from ..rollout.render import render_modelfile

    if not manifest.source.is_local:
        return [f"modelfile.template: {manifest.modelfile.template}: checked against the hub model's chat template "
                "by plan"]
    chat = resolve_chat(manifest.modelfile, Path(manifest.source.model))
    render_modelfile(manifest.modelfile, Path(f"{manifest.name}.gguf"), chat)  # checks a custom template
    if not chat.expected:
        return [f"modelfile.template: {chat.template_name}: not checked (the model has no chat template, or "
                "modelfile.unchecked_template names it)"]
    notes = [f"modelfile.template: {chat.template_name}: renders the model's chat template on "
             f"{len(chat.expected)} conversations; stops {', '.join(chat.stops)}"]
    return notes + [f"modelfile.template: {chat.template_name}: {r.describe()}" for r in chat.refused]
