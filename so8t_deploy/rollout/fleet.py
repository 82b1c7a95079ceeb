"""Roll a manifest out to every target: canaries first, then the rest `parallelism` at a time.

Each host is all or nothing (see host_apply). `rollout.on_failure` decides what a failed host
means for the others: `rollback` stops the rollout when a canary fails (no other host is
touched) and lets the remaining hosts finish otherwise; `halt` stops starting hosts after any
failure; `continue` rolls out to every host regardless. Ctrl-C stops starting hosts, and every
host in flight finishes or undoes its current step and rolls back.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..build.workspace import Workspace
from ..cancel import CancelToken, leave_interrupts_to_the_main_thread
from ..errors import HostError, HostUnreachableError
from ..manifest.schema import Manifest, Target
from ..manifest.secrets import Redactor
from ..progress import Progress
from .desired import DesiredModel
from .host_apply import HostReport, HostRollout, HostStatus, connect
from .host_plan import HostPlan, observe_host
from .records import HostRecords


def plan_hosts(manifest: Manifest, desired: list[DesiredModel], workspace: Workspace) -> list[HostPlan]:
    """What apply would do on each host, from what each reports now; changes nothing."""
    plans, redact = [], Redactor.for_manifest(manifest)
    for target in manifest.targets:
        with connect(target) as host:
            try:
                plan = observe_host(host, manifest, desired, HostRecords(workspace.hosts, target.host))
                plans.append(plan.model_copy(update={"warnings": redact.all(plan.warnings)}))
            except HostError as e:
                plans.append(HostPlan(target=target.name, url=target.host, error=redact(str(e)),
                                      unreachable=isinstance(e, HostUnreachableError)))
    return plans


def apply_rollout(manifest: Manifest, plans: list[HostPlan], models: dict[str, DesiredModel], held: set[str],
                  workspace: Workspace, progress: Progress, cancel: CancelToken, *,
                  check_observed: bool) -> list[HostReport]:
    """Execute each host's plan; `check_observed` first compares each host with what the plan saw."""
    policy = manifest.rollout.on_failure
    canaries, rest = manifest.targets[:manifest.rollout.canary], manifest.targets[manifest.rollout.canary:]
    by_target = {p.target: p for p in plans}
    reports: dict[str, HostReport] = {}

    def roll(target: Target) -> HostReport:
        if cancel.cancelled:
            report = _skipped(target, "not attempted: interrupted")
        elif policy == "halt" and any(r.status is not HostStatus.OK for r in reports.values()):
            report = _skipped(target, "not attempted: the rollout halted after a failure")
        else:
            rollout = HostRollout(manifest, target, by_target[target.name], models, held, workspace, progress, cancel)
            report = rollout.run(check_observed=check_observed)
        reports[target.name] = report
        return report

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
    for target in manifest.targets:
        reports.setdefault(target.name, _skipped(target, "not attempted: a canary failed"))
    return [reports[t.name] for t in manifest.targets]


def _skipped(target: Target, why: str) -> HostReport:
    return HostReport(target.name, target.host, status=HostStatus.SKIPPED, error=why)
