"""Bring one host to its plan, blue/green per tag: a live tag only ever serves a smoke-tested model.

1. upload every missing GGUF (nothing the host serves changes); in registry mode nothing is uploaded;
2. check that the host is still as planned, then tidy what interrupted runs left (see host_plan);
3. per changed tag: create the new model as `TAG-candidate` (re-checking its blob first: a
   restarting server prunes unreferenced blobs). A create is sent once, with `"stream": false`;
   when its answer is lost the host is polled for it, and only what it reports decides. In
   registry mode the host pulls the published image instead (`HOST/NAMESPACE/NAME:TAG`, which
   must then list the published digest), which is copied to `TAG-candidate` and deleted;
4. smoke-test every candidate (and every live tag an interrupted promotion left);
5. promote, only once every test on the host passed: copy the live tag to `TAG-rollback`, then
   the candidate to the live tag (the manifest, byte for byte: the model that passed);
6. converge: delete the old `TAG-prev` (Ollama frees the layers of a manifest that /api/copy
   overwrites only at a restart, so a backup is deleted before anything is copied over it),
   copy `TAG-rollback` to `TAG-prev`, delete `TAG-rollback` and the candidate, prune.

Any failure up to step 5 (an HTTP or in-stream create error, a create that never appeared, a
failed smoke test, Ctrl-C) undoes what this run changed on the host: promoted tags get their
model back from `TAG-rollback` (or are deleted if they did not exist), and candidates are
deleted, so the host serves exactly what it did and keeps every backup. The report names
whatever could not be restored. A run killed at any point leaves the live tags serving tested
models, plus `-candidate` and `-rollback` tags that the next run, from any machine, tidies or
finishes. Every tag that may exist because of this run is in the `InFlight` ledger until it is
gone, so an apply stopped at once can say what it left.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum

from ..errors import BuildError, HostChangedError, HostError, HostUnreachableError, Interrupted
from ..external.ollama_host import CreateRequest, OllamaHost
from ..manifest.deploy_schema import Target
from ..manifest.secrets import Redactor
from .desired import CANDIDATE_SUFFIX, ROLLBACK_SUFFIX, DesiredModel
from .host_plan import HostPlan, TagDecision, TagKind, as_named, changed_since, matches_shown, pulled_copy_of
from .records import HostRecords, TagRecord
from .run_context import RunContext
from .smoke import CANNOT_RENDER, SmokeResult, run_smoke_tests

WAITING_LINE_EVERY_S = 30.0  # how often a create the host is still working on shows an elapsed-time line


class HostStatus(StrEnum):
    PENDING = "pending"
    OK = "ok"  # converged
    FAILED = "failed"  # rolled back (see unrestored), or serving the new models but not tidied (see left)
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
    created: list[str] = field(default_factory=list)  # tags whose candidate this run created
    pulled: list[str] = field(default_factory=list)  # registry mode: tags whose candidate this run pulled
    verified: list[str] = field(default_factory=list)  # live tags an interrupted promotion left, smoke-tested now
    promoted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # the quality gate held these back: left as they were
    tidied: list[str] = field(default_factory=list)  # leftovers of interrupted runs
    deleted: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    unrestored: list[str] = field(default_factory=list)  # "tag: why" for what a rollback could not undo
    left: list[str] = field(default_factory=list)  # companions still on the host after a failure, for the next run
    smoke: list[SmokeResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    serving_new: bool = False  # every candidate was promoted: a failure after that is not rolled back

    @property
    def outcome(self) -> str:
        if self.status is HostStatus.OK:
            return "converged"
        if self.unrestored:
            return "NOT restored: " + "; ".join(self.unrestored)
        if self.serving_new:
            return "serving the new models; the next apply tidies " + (", ".join(self.left) or "the rest")
        return "as it was" if not self.rolled_back else "restored to how it was"


class SmokeFailed(HostError):
    """At least one changed tag failed its smoke test on this host."""


class InFlight:
    """Tags that may exist on a host because of this run and are not where they belong yet (candidates,
    rollback copies), across every host of a rollout; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tags: dict[str, set[str]] = {}

    def add(self, host: str, tag: str) -> None:
        with self._lock:
            self._tags.setdefault(host, set()).add(tag)

    def discard(self, host: str, tag: str) -> None:
        with self._lock:
            self._tags.get(host, set()).discard(tag)

    def describe(self) -> str:
        """'host-a: x:y-candidate, ...; host-b: ...', or "" when nothing is left."""
        with self._lock:
            return "; ".join(f"{host}: {', '.join(sorted(tags))}" for host, tags in sorted(self._tags.items()) if tags)


def connect(target: Target) -> OllamaHost:
    headers = {name: value.get_secret_value() for name, value in target.headers.items()}
    return OllamaHost(target.name, target.host, headers, timeout=target.timeout_s)


def redact_smoke(result: SmokeResult, redact: Redactor) -> SmokeResult:
    """A smoke result's server-made text (a load error, the reply) with the manifest's secrets redacted."""
    return replace(result, reason=redact(result.reason), response=redact(result.response))


@contextmanager
def ticking(every: float, tick: Callable[[float], None]) -> Iterator[None]:
    """Call tick(elapsed seconds) every `every` seconds from a helper thread while the block runs."""
    done = threading.Event()

    def run() -> None:
        elapsed = 0.0
        while not done.wait(every):
            elapsed += every
            tick(elapsed)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class HostRollout:
    """Execute one host's plan. `models` holds every desired tag, built where the plan creates it."""

    def __init__(self, run: RunContext, target: Target, plan: HostPlan, models: dict[str, DesiredModel],
                 inflight: InFlight | None = None):
        manifest = run.manifest
        self.manifest, self.target, self.plan, self.models = manifest, target, plan, models
        self.workspace, self.progress, self.cancel = run.workspace, run.progress, run.cancel
        self.inflight = inflight or InFlight()
        self.report = HostReport(target.name, target.host, warnings=list(plan.warnings))
        self.redact = Redactor.for_manifest(manifest)  # every message taken from an exception passes through it
        self.records = HostRecords(run.workspace.hosts, target.host)
        self.registry = manifest.distribution.registry
        self.expected = dict(plan.observed)  # what the host holds, as observed and then changed by this run
        self._candidates: list[DesiredModel] = []  # created or reused by this run, not yet promoted
        self._promoted: list[DesiredModel] = []

    def run(self) -> HostReport:
        if self.plan.error is not None:
            self.report.error = self.plan.error
            self.report.status = HostStatus.UNREACHABLE if self.plan.unreachable else HostStatus.FAILED
            return self.report
        self.report.unchanged = self.plan.tags(TagKind.UNCHANGED)
        self.report.held = self.plan.tags(TagKind.HELD)
        if self.plan.idle:  # observed once, by the plan: nothing more to ask
            self.report.status = HostStatus.OK
            return self.report
        with self.workspace.lock(f"host-{self.records.path.stem}"), connect(self.target) as host:
            self._execute(host)
        return self.report

    # -- the run --------------------------------------------------------------------------------------------

    def _execute(self, host: OllamaHost) -> None:
        creates = [d for d in self.plan.decisions if d.kind is TagKind.CREATE]
        verifies = [d for d in self.plan.decisions if d.kind is TagKind.VERIFY]
        try:
            for decision in creates:
                self.cancel.check()
                if not decision.reuse_candidate and self.registry is None:
                    self._upload(host, self.models[decision.tag])
            self.cancel.check()
            self._check_unchanged(host, changed_since(self.plan, self.manifest, self._tags(host)))
            self._tidy(host)
            for decision in creates:
                self.cancel.check()
                self._candidate(host, decision)
            self._smoke(host, creates, verifies)
            self.cancel.check()
            for decision in creates:
                self._promote(host, self.models[decision.tag])
        except (HostError, Interrupted) as e:
            self._fail(e)
            self._roll_back(host, verifies)
            return
        except Exception as e:  # a bug must not leave a host half-changed either
            self._fail(e)
            self._roll_back(host, verifies)
            raise
        self.report.serving_new = True
        try:
            self._converge(host, creates, verifies)
        except HostError as e:  # every live tag serves a tested model: finish on the next run, not undo
            self._fail(e)
            self.report.left = sorted(t for t in self._companions() if t in self.expected)
            return
        self.report.status = HostStatus.OK

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

    def _tags(self, host: OllamaHost) -> dict[str, str]:
        """The host's models, the manifest's tags and companions in the manifest's spelling (see as_named)."""
        return as_named(self.manifest, host.tags())

    def _check_unchanged(self, host: OllamaHost, changed: list[str]) -> None:
        if changed:
            raise HostChangedError(f"{host.name}: changed since the plan was made ({', '.join(changed[:3])}"
                                   f"{' ...' if len(changed) > 3 else ''}, by someone else); stopped before "
                                   "overwriting anything; run plan again")

    def _check_tag(self, host: OllamaHost, model: DesiredModel) -> None:
        """Right before a change: the tag and its companions are still what this run expects (another apply
        may have started since)."""
        now = self._tags(host)
        names = (model.tag, model.candidate_tag, model.rollback_tag, model.backup_tag,
                 *((model.image.reference,) if model.image is not None and self.registry is not None else ()))
        self._check_unchanged(host, [n for n in names if now.get(n) != self.expected.get(n)])

    # -- changes, each recorded in `expected` and the in-flight ledger ------------------------------------

    def _copy(self, host: OllamaHost, source: str, destination: str) -> None:
        if destination.endswith((ROLLBACK_SUFFIX, CANDIDATE_SUFFIX)):
            self.inflight.add(host.name, destination)  # before: the copy may land although its answer is lost
        host.copy(source, destination)
        self.expected[destination] = self.expected.get(source, "?")

    def _delete(self, host: OllamaHost, tag: str) -> None:
        host.delete(tag)
        self.expected.pop(tag, None)
        self.inflight.discard(host.name, tag)

    def _companions(self) -> list[str]:
        return [m.tag + s for m in self.models.values() for s in (CANDIDATE_SUFFIX, ROLLBACK_SUFFIX)]

    # -- steps ----------------------------------------------------------------------------------------------

    def _upload(self, host: OllamaHost, model: DesiredModel) -> None:
        path, digest, size = model.built_file()
        if host.has_blob(digest):
            return
        self.progress.step(f"{host.name}: upload {path.name}")
        advance = self.progress.transfer(f"upload {path.name} to {host.name}", size)
        self.report.uploaded_bytes += host.upload_blob(path, digest, advance)

    def _tidy(self, host: OllamaHost) -> None:
        """What interrupted runs left: an unwanted candidate is deleted; a `-rollback` copy that duplicates the
        live tag or the backup is deleted, and any other becomes the backup (its promotion had happened)."""
        for name in self.plan.tidy:
            if pulled_copy_of(self.manifest, name) is not None:  # a registry-mode pull never copied to its candidate
                self._delete(host, name)
                self.report.tidied.append(name)
                continue
            model = next(m for m in self.models.values() if name in (m.candidate_tag, m.rollback_tag))
            if name == model.rollback_tag:
                rollback = self.expected.get(name)
                if rollback not in (self.expected.get(model.tag), self.expected.get(model.backup_tag)):
                    self._replace_backup(host, model)
            if name in self.expected:
                self._delete(host, name)
            self.report.tidied.append(name)

    def _candidate(self, host: OllamaHost, decision: TagDecision) -> None:
        model = self.models[decision.tag]
        self._check_tag(host, model)
        self._candidates.append(model)
        if decision.reuse_candidate:
            self.inflight.add(host.name, model.candidate_tag)
            return
        if self.registry is not None:
            self._pull(host, model)
        else:
            self._create(host, model)
        if not matches_shown(host.show(model.candidate_tag), model):
            raise HostError(f"{host.name}: {model.candidate_tag} does not hold what was sent (template, system, "
                            f"parameters or GGUF keys differ after the {'pull' if self.registry else 'create'})")

    def _create(self, host: OllamaHost, model: DesiredModel) -> None:
        self._upload(host, model)  # the blob may have been pruned since the upload phase
        path, digest, size = model.built_file()
        self.inflight.add(host.name, model.candidate_tag)  # before: a create whose answer is lost may land
        self.progress.step(f"{host.name}: create {model.candidate_tag}")
        line = f"{host.name}: create {model.candidate_tag}: the host is still working ({{:.0f}} s)"
        with ticking(WAITING_LINE_EVERY_S, lambda elapsed: self.progress.step(line.format(elapsed))):
            host.create(CreateRequest(model.candidate_tag, {path.name: digest}, model.template, model.system,
                                      model.parameters), size=size)
        self.expected[model.candidate_tag] = self._tags(host).get(model.candidate_tag, "?")
        self.report.created.append(model.tag)

    def _pull(self, host: OllamaHost, model: DesiredModel) -> None:
        """Registry mode: the host pulls the published image, which must arrive as published, byte for byte; it
        becomes the candidate, and the pulled name goes. The host lists the pulled name in its own spelling
        (Ollama reuses the case of a part it already holds), which is the one copied and deleted."""
        assert self.registry is not None
        if model.image is None:
            raise BuildError(f"{model.tag}: not published (internal: a pull needs the published image)")
        reference, size = model.image.reference, model.size or 0
        self.inflight.add(host.name, reference)  # before: a pull whose answer is lost may land
        self.progress.step(f"{host.name}: pull {reference}")
        advance = self.progress.transfer(f"{host.name} pulls {model.gguf_name}", size)
        host.pull(reference, insecure=self.registry.insecure, size=size, progress=advance, check=self.cancel.check)
        listed = host.tags()
        pulled_as = next((name for name in listed if name.lower() == reference.lower()), reference)
        if pulled_as != reference:
            self.inflight.discard(host.name, reference)
            self.inflight.add(host.name, pulled_as)
        self.expected[pulled_as] = pulled = listed.get(pulled_as, "?")
        if pulled.removeprefix("sha256:") != model.image.digest.removeprefix("sha256:"):  # /api/tags lists hex
            raise HostError(f"{host.name}: the pull of {reference} left {pulled if pulled != '?' else 'nothing'}, "
                            f"not the published {model.image.digest}")
        self._copy(host, pulled_as, model.candidate_tag)
        self._delete(host, pulled_as)
        self.report.pulled.append(model.tag)

    def _smoke(self, host: OllamaHost, creates: list[TagDecision], verifies: list[TagDecision]) -> None:
        tags = [d.tag for d in (*creates, *verifies)]
        if not tags:
            return
        self.progress.step(f"{host.name}: smoke-test {len(tags)} tags")
        names = {d.tag: self.models[d.tag].candidate_tag for d in creates}
        results = run_smoke_tests(host, tags, self.manifest.smoke, self.manifest.modelfile.effective_parameters,
                                  models=names, cancel=self.cancel, desired=self.models)
        if skipped := sorted({r.tag for r in results if r.reason == CANNOT_RENDER}):
            warning = f"{host.name}: conversation check of {', '.join(skipped)} {CANNOT_RENDER} (an older Ollama?)"
            self.report.warnings.append(warning)
            self.progress.warning(warning)
        self.report.smoke = [redact_smoke(r, self.redact) for r in results]
        failed = [r for r in self.report.smoke if not r.passed]
        if failed:
            detail = "; ".join(f"{r.tag}: {r.reason}" for r in failed[:3])
            raise SmokeFailed(f"smoke test failed ({detail})")

    def _promote(self, host: OllamaHost, model: DesiredModel) -> None:
        self._check_tag(host, model)
        self.progress.step(f"{host.name}: promote {model.tag}")
        self._promoted.append(model)
        if model.tag in self.expected:
            self._copy(host, model.tag, model.rollback_tag)
        self._copy(host, model.candidate_tag, model.tag)
        self.report.promoted.append(model.tag)

    def _replace_backup(self, host: OllamaHost, model: DesiredModel) -> None:
        """`TAG-rollback` becomes `TAG-prev`: the old backup is deleted first, so no layer is orphaned."""
        if model.backup_tag in self.expected:
            self._delete(host, model.backup_tag)
        self._copy(host, model.rollback_tag, model.backup_tag)

    def _converge(self, host: OllamaHost, creates: list[TagDecision], verifies: list[TagDecision]) -> None:
        for decision in (*creates, *verifies):
            model = self.models[decision.tag]
            if model.rollback_tag in self.expected:
                self._replace_backup(host, model)
                self._delete(host, model.rollback_tag)
            if model.candidate_tag in self.expected:
                self._delete(host, model.candidate_tag)
            if decision.kind is TagKind.VERIFY:
                self.report.verified.append(model.tag)
        for tag in self.plan.deletes:
            self._delete(host, tag)
            self.report.deleted.append(tag)
        now = self._tags(host)
        for decision in (*creates, *verifies):
            model = self.models[decision.tag]
            self.records.put(model.tag, TagRecord(model.spec_digest, now.get(model.tag)))

    def _roll_back(self, host: OllamaHost, verifies: list[TagDecision]) -> None:
        """Serve exactly what the host served before this run: promoted tags get their model back, candidates this
        run created go, and a live tag left by an interrupted promotion whose own smoke test failed gets its older
        model back (as does a reused candidate that failed: it is deleted)."""
        failed = {r.tag for r in self.report.smoke if not r.passed}
        restore = [*reversed(self._promoted), *(self.models[d.tag] for d in verifies if d.tag in failed)]
        reused = {d.tag for d in self.plan.decisions if d.reuse_candidate}
        drop = [m for m in self._candidates if m.tag not in reused or m.tag in failed]
        steps = [(m.tag, self._restore, m) for m in restore] + [(m.candidate_tag, self._drop, m) for m in drop]
        if self.registry is not None:  # a pull whose answer was lost may have landed
            steps += [(m.image.reference, self._drop_pulled, m) for m in drop if m.image is not None]
        for name, step, model in steps:
            try:
                step(host, model)
            except HostError as e:
                self.report.unrestored.append(f"{name}: {self.redact(str(e))}")
                continue
            if name == model.tag:
                self.report.rolled_back.append(name)
        for model in self._candidates:
            if model not in drop:  # a leftover this run found and leaves as it was
                self.inflight.discard(host.name, model.candidate_tag)
        if steps:
            self.progress.warning(f"{host.name}: {self.report.outcome}")

    def _restore(self, host: OllamaHost, model: DesiredModel) -> None:
        if model.rollback_tag in self.expected:
            self._copy(host, model.rollback_tag, model.tag)
            self._delete(host, model.rollback_tag)
        else:  # it did not exist before this run
            self._delete(host, model.tag)

    def _drop(self, host: OllamaHost, model: DesiredModel) -> None:
        self._delete(host, model.candidate_tag)  # also when its create failed: a lost answer may still land

    def _drop_pulled(self, host: OllamaHost, model: DesiredModel) -> None:
        assert model.image is not None
        listed = next((n for n in host.tags() if n.lower() == model.image.reference.lower()), None)
        if listed is not None:
            self._delete(host, listed)
        self.inflight.discard(host.name, model.image.reference)
