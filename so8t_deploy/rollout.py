"""plan and apply: bring every host to the manifest's desired state, canary first, safely.

Planning observes a host (its tags, /api/show where needed, and what we recorded at the last
upload) and lists the actions, changing nothing. Applying runs them host by host: upload
missing blobs, keep the tag being replaced as a backup (`copy`), create, smoke-test, and on
a failed smoke test follow `rollout.on_failure`. A host that fails never hides another's
result; canary hosts go first, and with rollback or halt a failed canary stops the rollout
before any other host is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .console import TransferProgress
from .desired import BACKUP_SUFFIX, DesiredModel
from .errors import HostError
from .external.ollama_host import OllamaHost
from .manifest import Manifest, Target
from .smoke import SmokeResult, run_smoke_tests


@dataclass
class Action:
    kind: str  # upload | backup | create | unchanged | delete
    tag: str
    detail: str = ""
    bytes: int = 0


@dataclass
class HostPlan:
    target: str
    url: str
    actions: list[Action] = field(default_factory=list)
    error: str | None = None

    @property
    def drift(self) -> bool:
        return self.error is not None or any(a.kind != "unchanged" for a in self.actions)


@dataclass
class HostReport:
    target: str
    url: str
    status: str = "pending"  # ok | failed | unreachable | skipped
    uploaded_bytes: int = 0
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    smoke: list[SmokeResult] = field(default_factory=list)
    error: str | None = None


class HostRecords:
    """What we created on one host: {tag: {manifest digest, spec digest}}; a hint, never the truth."""

    def __init__(self, state_dir: Path, url: str):
        self.path = state_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            self.entries = {}

    def matches(self, model: DesiredModel, manifest_digest: str | None) -> bool:
        entry = self.entries.get(model.tag)
        return bool(entry and manifest_digest and entry == {"manifest": manifest_digest, "spec": model.spec_digest})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.entries, indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(self.path)


def _show_parameters(block: str) -> dict[str, Any]:
    """Parse /api/show's parameters text ('key   value' per line; strings JSON-quoted)."""
    out: dict[str, Any] = {}
    for line in block.splitlines():
        key, _, raw = line.strip().partition(" ")
        if not key:
            continue
        raw = raw.strip()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key == "stop":
            out.setdefault("stop", []).append(str(value))
        else:
            out[key] = value
    return out


def _same_parameters(wanted: dict[str, Any], seen: dict[str, Any]) -> bool:
    if set(wanted) != set(seen):
        return False
    for key, value in wanted.items():
        other = seen[key]
        if isinstance(value, float) or isinstance(other, float):
            try:
                if abs(float(value) - float(other)) > 1e-6:
                    return False
            except (TypeError, ValueError):
                return False
        elif value != other:
            return False
    return True


def _matches_host_copy(host: OllamaHost, model: DesiredModel) -> bool:
    """Recognise an identical model from /api/show alone (no local record, e.g. a fresh CI clone)."""
    shown = host.show(model.tag)
    if shown is None:
        return False
    info = {k: str(v) for k, v in (shown.get("model_info") or {}).items()}
    return (shown.get("template", "") == model.template
            and (shown.get("system") or None) == (model.system or None)
            and _same_parameters(model.parameters, _show_parameters(shown.get("parameters", "")))
            and all(info.get(k) == v for k, v in model.identity.items()) and len(model.identity) == 3)


def _namespace_extras(manifest: Manifest, tags: dict[str, str]) -> list[str]:
    """Models in this manifest's name that it no longer names (backups of named tags are kept)."""
    named = manifest.tags()
    wanted = set(named) | {tag + BACKUP_SUFFIX for tag in named}
    prefix = re.escape(manifest.name) + ":"
    return sorted(t for t in tags if re.match(prefix, t) and t not in wanted)


def _unchanged(host: OllamaHost, tags: dict[str, str], records: HostRecords, model: DesiredModel) -> bool:
    """Fast path: the digest we recorded at creation; else compare what the host shows."""
    return model.tag in tags and (records.matches(model, tags[model.tag]) or _matches_host_copy(host, model))


def plan_host(manifest: Manifest, target: Target, desired: list[DesiredModel], state_dir: Path,
              unbuilt: tuple[str, ...] = ()) -> HostPlan:
    plan = HostPlan(target.name, target.host)
    host = connect(target)
    try:
        host.check_version()
        tags = host.tags()
        records = HostRecords(state_dir, target.host)
        for tag in unbuilt:
            plan.actions += [Action("upload", tag, "after build"), Action("create", tag, "after build")]
        for model in desired:
            if _unchanged(host, tags, records, model):
                plan.actions.append(Action("unchanged", model.tag))
                continue
            if not host.has_blob(model.digest):
                plan.actions.append(Action("upload", model.tag, model.gguf.name, model.size))
            if model.tag in tags:
                plan.actions.append(Action("backup", model.tag, f"copy to {model.backup_tag}"))
            plan.actions.append(Action("create", model.tag, model.digest[:19]))
        if manifest.rollout.prune:
            plan.actions += [Action("delete", tag, "pruned") for tag in _namespace_extras(manifest, tags)]
    except HostError as e:
        plan.error = str(e)
    finally:
        host.close()
    return plan


def connect(target: Target) -> OllamaHost:
    headers = {name: value.get_secret_value() for name, value in target.headers.items()}
    return OllamaHost(target.name, target.host, headers)


class _HostRollout:
    def __init__(self, manifest: Manifest, target: Target, desired: list[DesiredModel], state_dir: Path,
                 progress: TransferProgress | None):
        self.manifest, self.target, self.desired = manifest, target, desired
        self.report = HostReport(target.name, target.host)
        self.state_dir, self.progress = state_dir, progress

    def _upload(self, host: OllamaHost, model: DesiredModel) -> None:
        advance = self.progress(f"upload {model.gguf.name} to {host.name}", model.size) if self.progress else None
        self.report.uploaded_bytes += host.upload_blob(model.gguf, model.digest, advance)

    def run(self) -> HostReport:
        host = connect(self.target)
        try:
            self._run(host)
        except HostError as e:
            self.report.error = str(e)
            self.report.status = "unreachable" if "unreachable" in str(e) else "failed"
        finally:
            host.close()
        return self.report

    def _run(self, host: OllamaHost) -> None:
        host.check_version()
        tags = host.tags()
        records = HostRecords(self.state_dir, self.target.host)
        changed, backed_up = [], set()
        for model in self.desired:
            if _unchanged(host, tags, records, model):
                self.report.unchanged.append(model.tag)
                continue
            if not host.has_blob(model.digest):
                self._upload(host, model)
            # Blobs no model references vanish when a server restarts: check again right before create.
            if not host.has_blob(model.digest):
                self._upload(host, model)
            if model.tag in tags:
                host.copy(model.tag, model.backup_tag)
                backed_up.add(model.tag)
            host.create(model.tag, {model.gguf.name: model.digest}, model.template, model.system, model.parameters)
            changed.append(model)
            self.report.created.append(model.tag)
        if changed:
            self._record(host, records, changed)
        self.report.smoke = run_smoke_tests(host, [m.tag for m in changed], self.manifest.smoke,
                                            self.manifest.modelfile.effective_parameters)
        if any(not r.passed for r in self.report.smoke):
            self.report.status = "failed"
            failed = sorted({r.tag for r in self.report.smoke if not r.passed})
            self.report.error = f"smoke test failed for {', '.join(failed)}"
            if self.manifest.rollout.on_failure == "rollback":
                self._roll_back(host, records, changed, backed_up)
            return
        if self.manifest.rollout.prune:
            for tag in _namespace_extras(self.manifest, host.tags()):
                if host.delete(tag):
                    self.report.deleted.append(tag)
        self.report.status = "ok"

    def _record(self, host: OllamaHost, records: HostRecords, changed: list[DesiredModel]) -> None:
        digests = host.tags()
        for model in changed:
            records.entries[model.tag] = {"manifest": digests.get(model.tag), "spec": model.spec_digest}
        records.save()

    def _roll_back(self, host: OllamaHost, records: HostRecords, changed: list[DesiredModel],
                   backed_up: set[str]) -> None:
        """Put back what each changed tag was: its backup, or nothing if it is new."""
        for model in changed:
            if model.tag in backed_up:
                host.copy(model.backup_tag, model.tag)
            else:
                host.delete(model.tag)
            records.entries.pop(model.tag, None)
            self.report.rolled_back.append(model.tag)
        records.save()


def apply_rollout(manifest: Manifest, desired: list[DesiredModel], state_dir: Path,
                  progress: TransferProgress | None = None) -> list[HostReport]:
    """Canary hosts in order, then the rest `parallelism` at a time; honours `on_failure`."""
    policy = manifest.rollout.on_failure
    canaries, rest = manifest.targets[:manifest.rollout.canary], manifest.targets[manifest.rollout.canary:]
    reports: dict[str, HostReport] = {}

    def roll(target: Target) -> HostReport:
        return _HostRollout(manifest, target, desired, state_dir, progress).run()

    stop = False
    for target in canaries:
        reports[target.name] = roll(target)
        if reports[target.name].status != "ok" and policy != "continue":
            stop = True
            break
    if not stop:
        with ThreadPoolExecutor(max_workers=manifest.rollout.parallelism) as pool:
            futures = {}
            for target in rest:
                futures[target.name] = pool.submit(_unless_halted, roll, target, reports, policy)
            for name, future in futures.items():
                reports[name] = future.result()
    for target in manifest.targets:
        reports.setdefault(target.name, HostReport(target.name, target.host, status="skipped",
                                                   error="not attempted: a canary failed"))
    return [reports[t.name] for t in manifest.targets]


def _unless_halted(roll, target: Target, reports: dict[str, HostReport], policy: str) -> HostReport:
    if policy == "halt" and any(r.status not in ("ok", "pending") for r in reports.values()):
        return HostReport(target.name, target.host, status="skipped", error="not attempted: rollout halted")
    report = roll(target)
    reports[target.name] = report
    return report


__all__ = ["BACKUP_SUFFIX", "apply_rollout", "plan_host"]
