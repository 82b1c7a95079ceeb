"""Bring one host to its plan, all or nothing: it ends fully converged, or exactly as it was.

The order keeps the window in which a live tag serves an untested model as short as it can be,
and always undoable:

1. upload every missing GGUF (nothing the host serves changes);
2. per tag: check that the tag is still what the plan observed (someone else may have deployed
   since: then stop, exit 3, and overwrite nothing), copy the live tag to `TAG-rollback`, journal
   the change, re-check the blob (a
   restarting server prunes unreferenced blobs) and create. A create is sent once: when its
   answer is lost the host is re-observed, and only what it reports decides;
3. smoke-test every changed tag (and any tag a dead run left unverified);
4. converge: each `TAG-rollback` becomes `TAG-prev`, the journal records the tags as verified,
   and tags the manifest no longer names are pruned.

Any failure after the first change (an HTTP or in-stream create error, a lost connection, a
failed smoke test, Ctrl-C) rolls back every tag this run changed on the host: the backup is
copied back, a tag that did not exist is deleted, and the report names whatever could not be
restored. The journal still says "unverified" for those, so the next run deals with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from ..build.workspace import Workspace
from ..cancel import CancelToken
from ..errors import HostChangedError, HostError, HostUnreachableError, Interrupted
from ..external.ollama_host import CreateOutcomeUnknown, OllamaHost
from ..manifest.schema import Manifest, Target
from ..manifest.secrets import Redactor
from ..progress import Progress
from .desired import DesiredModel
from .host_plan import HostPlan, TagDecision, TagKind, changed_since, matches_shown
from .records import HostRecords, TagRecord
from .smoke import SmokeResult, run_smoke_tests


class HostStatus(StrEnum):
    PENDING = "pending"
    OK = "ok"  # converged
    FAILED = "failed"  # rolled back (see unrestored)
    UNREACHABLE = "unreachable"
    CHANGED = "changed"  # changed by someone else since the plan: stopped before overwriting anything
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"


@dataclass
class HostReport:
    target: str
    url: str
    status: HostStatus = HostStatus.PENDING
    uploaded_bytes: int = 0
    created: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)  # tags a dead run left, smoke-tested now
    unchanged: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # the quality gate held these back: left as they were
    deleted: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    unrestored: list[str] = field(default_factory=list)  # "tag: why" for what a rollback could not undo
    smoke: list[SmokeResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def outcome(self) -> str:
        if self.status is HostStatus.OK:
            return "converged"
        if self.unrestored:
            return "NOT restored: " + "; ".join(self.unrestored)
        return "as it was" if not self.rolled_back else "restored to how it was"


class SmokeFailed(HostError):
    """At least one changed tag failed its smoke test on this host."""


def connect(target: Target) -> OllamaHost:
    headers = {name: value.get_secret_value() for name, value in target.headers.items()}
    return OllamaHost(target.name, target.host, headers, timeout=target.timeout_s)


def redact_smoke(result: SmokeResult, redact: Redactor) -> SmokeResult:
    """A smoke result's server-made text (a load error, the reply) with the manifest's secrets redacted."""
    return replace(result, reason=redact(result.reason), response=redact(result.response))


class HostRollout:
    """Execute one host's plan. `models` holds every desired tag, built where the plan creates it."""

    def __init__(self, manifest: Manifest, target: Target, plan: HostPlan, models: dict[str, DesiredModel],
                 held: set[str], workspace: Workspace, progress: Progress, cancel: CancelToken):
        self.manifest, self.target, self.plan, self.models, self.held = manifest, target, plan, models, held
        self.workspace, self.progress, self.cancel = workspace, progress, cancel
        self.report = HostReport(target.name, target.host, warnings=list(plan.warnings))
        self.redact = Redactor.for_manifest(manifest)  # every message taken from an exception passes through it
        self.records = HostRecords(workspace.hosts, target.host)
        self._before = dict(self.records.entries)

    def run(self, *, check_observed: bool) -> HostReport:
        """With `check_observed` (a saved plan), first make sure the host is still as the plan saw it."""
        if self.plan.error is not None:
            self.report.error = self.plan.error
            self.report.status = HostStatus.UNREACHABLE if self.plan.unreachable else HostStatus.FAILED
            return self.report
        with self.workspace.lock(f"host-{self.records.path.stem}"), connect(self.target) as host:
            try:
                if check_observed:
                    self._check_unchanged_since_plan(host)
            except HostError as e:  # nothing was changed
                self._fail(e)
                return self.report
            self._execute(host)
        return self.report

    def _check_unchanged_since_plan(self, host: OllamaHost) -> None:
        changed = changed_since(self.plan, self.manifest, host.tags())
        if changed:
            raise HostChangedError(f"{host.name}: changed since the plan was made ({', '.join(changed[:3])}"
                                   f"{' ...' if len(changed) > 3 else ''}); run plan again")

    def _fail(self, error: BaseException) -> None:
        self.report.error = self.redact(str(error))
        if isinstance(error, Interrupted):
            self.report.status = HostStatus.INTERRUPTED
        elif isinstance(error, HostChangedError):
            self.report.status = HostStatus.CHANGED
        elif isinstance(error, HostUnreachableError):
            self.report.status = HostStatus.UNREACHABLE
        else:
            self.report.status = HostStatus.FAILED

    def _execute(self, host: OllamaHost) -> None:
        decisions = self.plan.decisions
        creates = [d for d in decisions if d.kind is TagKind.CREATE and d.tag not in self.held]
        verifies = [d for d in decisions if d.kind is TagKind.VERIFY]
        self.report.unchanged = [d.tag for d in decisions if d.kind is TagKind.UNCHANGED]
        self.report.held = [d.tag for d in decisions if d.kind is TagKind.CREATE and d.tag in self.held]
        touched: list[TagDecision] = list(verifies)  # tags whose live state this run may leave changed
        try:
            for decision in creates:
                self.cancel.check()
                self._upload(host, self.models[decision.tag])
            for decision in creates:
                self.cancel.check()
                self._check_still_as_planned(host, decision)
                touched.append(decision)
                self._change(host, decision)
            self.cancel.check()
            self._smoke(host, [d.tag for d in (*creates, *verifies)])
            self.cancel.check()
            self._converge(host, [*creates, *verifies])
        except (HostError, Interrupted) as e:
            self._fail(e)
            self._roll_back(host, touched)
            return
        except Exception as e:  # a bug must not leave a host half-changed either
            self._fail(e)
            self._roll_back(host, touched)
            raise
        self.report.status = HostStatus.OK

    def _check_still_as_planned(self, host: OllamaHost, decision: TagDecision) -> None:
        """Someone else may have deployed since the plan: never overwrite their tag, or a backup."""
        model, now = self.models[decision.tag], host.tags()
        for name, expected in ((model.tag, decision.observed_digest),
                               (model.rollback_tag, self.plan.observed.get(model.rollback_tag))):
            if now.get(name) != expected:
                raise HostChangedError(f"{host.name}: {name} changed since the plan was made (by someone else); "
                                       "stopped before overwriting it")

    def _upload(self, host: OllamaHost, model: DesiredModel) -> None:
        path, digest, size = model.built_file()
        if host.has_blob(digest):
            return
        self.progress.step(f"{host.name}: upload {path.name}")
        advance = self.progress.transfer(f"upload {path.name} to {host.name}", size)
        self.report.uploaded_bytes += host.upload_blob(path, digest, advance)

    def _change(self, host: OllamaHost, decision: TagDecision) -> None:
        model = self.models[decision.tag]
        if decision.needs_backup:
            host.copy(model.tag, model.rollback_tag)
        self.records.put(model.tag, TagRecord(model.spec_digest, None, verified=False,
                                              existed_before=decision.existed_before))
        self._upload(host, model)  # the blob may have been pruned since the upload phase
        self.progress.step(f"{host.name}: create {model.tag}")
        path, digest, size = model.built_file()
        try:
            host.create(model.tag, {path.name: digest}, model.template, model.system, model.parameters,
                        size=size, on_status=self._status_lines(f"{host.name}: {model.tag}: "))
        except CreateOutcomeUnknown as e:
            # Never send it again: ask the host what it holds now.
            self.progress.warning(f"{self.redact(str(e))}; re-observing {host.name} instead of sending the create "
                                  "again")
            if not matches_shown(host.show(model.tag), model):
                raise
        self.report.created.append(model.tag)

    def _status_lines(self, prefix: str) -> Callable[[str], None]:
        """Show a create's status lines, each once (the server repeats one per tensor with a byte count)."""
        last: list[str] = []

        def show(status: str) -> None:
            if last != [status]:
                last[:] = [status]
                self.progress.step(prefix + status)

        return show

    def _smoke(self, host: OllamaHost, tags: list[str]) -> None:
        if not tags or not self.manifest.smoke:
            return
        self.progress.step(f"{host.name}: smoke-test {len(tags)} tags")
        results = run_smoke_tests(host, tags, self.manifest.smoke, self.manifest.modelfile.effective_parameters)
        self.report.smoke = [redact_smoke(r, self.redact) for r in results]
        failed = [r for r in self.report.smoke if not r.passed]
        if failed:
            detail = "; ".join(f"{r.tag}: {r.reason}" for r in failed[:3])
            raise SmokeFailed(f"smoke test failed ({detail})")

    def _converge(self, host: OllamaHost, decisions: list[TagDecision]) -> None:
        tags = host.tags()
        for decision in decisions:
            model = self.models[decision.tag]
            self.records.put(model.tag, TagRecord(model.spec_digest, tags.get(model.tag), verified=True))
            if model.rollback_tag in tags:
                host.copy(model.rollback_tag, model.backup_tag)
                host.delete(model.rollback_tag)
            if decision.kind is TagKind.VERIFY:
                self.report.verified.append(model.tag)
        for tag in self.plan.deletes:
            if host.delete(tag):
                self.report.deleted.append(tag)

    def _roll_back(self, host: OllamaHost, touched: list[TagDecision]) -> None:
        """Put back what each touched tag was: its backup, or nothing if this run (or a dead one) created it."""
        for decision in reversed(touched):
            model = self.models[decision.tag]
            try:
                tags = host.tags()
                if model.rollback_tag in tags:
                    host.copy(model.rollback_tag, model.tag)
                    host.delete(model.rollback_tag)
                elif not decision.existed_before and model.tag in tags:
                    host.delete(model.tag)
                elif decision.existed_before and tags.get(model.tag) != decision.observed_digest:
                    raise HostError(f"no backup of {model.tag} to restore")
            except HostError as e:
                self.report.unrestored.append(f"{model.tag}: {self.redact(str(e))}")
                continue
            previous = self._before.get(model.tag)
            self.records.put(model.tag, previous if previous is not None and previous.verified else None)
            self.report.rolled_back.append(model.tag)
        if touched:
            self.progress.warning(f"{host.name}: rolled back {len(self.report.rolled_back)} of {len(touched)} "
                                  f"tags; {self.report.outcome}")
