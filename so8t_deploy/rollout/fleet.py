"""Roll a manifest out to every target: canaries first, then the rest `parallelism` at a time.

Every host is observed before the first change (that is the plan), and each host is all or
nothing (see host_apply). `rollout.on_failure` decides what a failed host, a down one included,
means for the others: `rollback` stops the rollout when a canary fails (no other host is
touched) and lets the remaining hosts finish otherwise; `halt` stops starting hosts after any
failure; `continue` rolls out to every host regardless. A host that someone else changed since
the plan stops the rollout the same way. Ctrl-C stops starting hosts, and every host in flight
finishes or undoes its current step and rolls back; a second Ctrl-C stops at once and names what
the run left on the hosts.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from ..cancel import leave_interrupts_to_the_main_thread
from ..errors import HostError, HostUnreachableError, Interrupted
from ..manifest.deploy_schema import Target
from ..manifest.schema import Manifest
from ..manifest.secrets import Redactor
from ..store.workspace import Workspace
from .desired import DesiredModel
from .host_apply import HostReport, HostRollout, HostStatus, InFlight, connect
from .host_plan import HostPlan, observe_host
from .records import HostRecords
from .run_context import RunContext

OBSERVE_PARALLELISM = 16  # hosts observed at once: reading, so not bounded by rollout.parallelism


def plan_hosts(manifest: Manifest, desired: list[DesiredModel], workspace: Workspace) -> list[HostPlan]:
    """What apply would do on each host, from what each reports now (hosts in parallel); changes nothing."""
    redact = Redactor.for_manifest(manifest)

    def observe(target: Target) -> HostPlan:
        with connect(target) as host:
            try:
                plan = observe_host(host, manifest, desired, HostRecords(workspace.hosts, target.host))
                return plan.model_copy(update={"warnings": redact.all(plan.warnings)})
            except HostError as e:
                return HostPlan(target=target.name, url=target.host, error=redact(str(e)),
                                unreachable=isinstance(e, HostUnreachableError))

    workers = max(1, min(len(manifest.targets), OBSERVE_PARALLELISM))
    with ThreadPoolExecutor(max_workers=workers, initializer=leave_interrupts_to_the_main_thread) as pool:
        return list(pool.map(observe, manifest.targets))


def apply_rollout(run: RunContext, plans: list[HostPlan], models: dict[str, DesiredModel]) -> list[HostReport]:
    """Execute each host's plan, canaries first, by the failure policy."""
    manifest, cancel = run.manifest, run.cancel
    policy = manifest.rollout.on_failure
    canaries, rest = manifest.targets[:manifest.rollout.canary], manifest.targets[manifest.rollout.canary:]
    by_target = {p.target: p for p in plans}
    reports: dict[str, HostReport] = {}
    lock, inflight = threading.Lock(), InFlight()

    def failed_so_far() -> bool:
        with lock:
            return any(r.status is not HostStatus.OK for r in reports.values())

    def roll(target: Target) -> HostReport:
        if cancel.cancelled:
            report = _skipped(target, "not attempted: interrupted")
        elif policy == "halt" and failed_so_far():
            report = _skipped(target, "not attempted: the rollout halted after a failure")
        else:
            report = HostRollout(run, target, by_target[target.name], models, inflight).run()
        with lock:
            reports[target.name] = report
        return report

    try:
        with cancel.cooperative():
            canary_failed = False
            for target in canaries:
                if roll(target).status is not HostStatus.OK and policy != "continue":
                    canary_failed = True
                    break
            if not canary_failed:
                with ThreadPoolExecutor(max_workers=manifest.rollout.parallelism,
                                        initializer=leave_interrupts_to_the_main_thread) as pool:
                    list(pool.map(roll, rest))
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, in the middle of a step
        left = inflight.describe()
        raise Interrupted("apply: stopped at once; " + (f"left on the hosts: {left}; the next apply tidies or "
                                                         "finishes them" if left else "no host was left changed")
                          ) from None
    for target in manifest.targets:
        reports.setdefault(target.name, _skipped(target, "not attempted: a canary did not converge"))
    return [reports[t.name] for t in manifest.targets]


def _skipped(target: Target, why: str) -> HostReport:
    return HostReport(target.name, target.host, status=HostStatus.SKIPPED, error=why)
