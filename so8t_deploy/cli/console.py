"""Human and machine output for commands: rich tables on a terminal, JSON with --json, Markdown for a PR.

The only module that prints what the domain reports; `ConsoleProgress` is the CLI's implementation
of the domain's Progress protocol.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from ..build.pipeline import BuildReport
    from ..deploy.execute import ApplyResult
    from ..deploy.plan import DeployPlan
    from ..manifest.schema import Manifest
    from ..quality.evaluate import QuantQuality
    from ..rollout.host_apply import HostReport
    from ..rollout.smoke import SmokeResult

# The terminal's width, or 80 columns when piped: every table folds long cells (paths, digests, errors)
# onto more lines instead of cutting them.
console = Console(highlight=False)


def print_json(data: object) -> None:
    console.out(json.dumps(data, indent=2, default=str), highlight=False)


class ConsoleProgress:
    """The CLI's `Progress`: step lines and warnings on stderr, byte bars on a terminal.

    Concurrent transfers share one live display (rich allows one per console); piped output gets
    the lines only, so --json on stdout stays clean.
    """

    def __init__(self) -> None:
        self._err = Console(stderr=True, highlight=False, soft_wrap=True)  # a log line stays one line
        self._bars: Progress | None = None

    def __enter__(self) -> ConsoleProgress:
        if sys.stderr.isatty():
            columns = (BarColumn(), _BytesOr(DownloadColumn(), TaskProgressColumn()),
                       _BytesOr(TransferSpeedColumn(), None), TimeRemainingColumn())
            self._bars = Progress("{task.description}", *columns, console=self._err)
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def step(self, message: str) -> None:
        from .typer_app import state

        state["step"] = message.removesuffix(" ...")  # what a last-resort error line names
        self._err.print(f"[bold]>[/bold] {escape(message)}")

    def warning(self, message: str) -> None:
        self._err.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}")

    def transfer(self, label: str, total: int, *, unit: str = "bytes") -> Callable[[int], None] | None:
        if self._bars is None:
            return None
        bars, task = self._bars, self._bars.add_task(label, total=total or None, unit=unit)
        return lambda n: bars.advance(task, n)


class _BytesOr(ProgressColumn):
    """`for_bytes` on a byte transfer, `otherwise` (or nothing) on a bar counting something else."""

    def __init__(self, for_bytes: ProgressColumn, otherwise: ProgressColumn | None):
        super().__init__()
        self.for_bytes, self.otherwise = for_bytes, otherwise

    def render(self, task: Task) -> RenderableType:
        if task.fields.get("unit") == "bytes":
            return self.for_bytes.render(task)
        return self.otherwise.render(task) if self.otherwise is not None else Text("")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    console.print(table)


def human_size(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return str(size)


# -- plan -----------------------------------------------------------------------------------------------

def plan_summary(plan: DeployPlan) -> dict[str, Any]:
    """What --json prints for a plan (the full plan is what --out saves)."""
    return {"manifest": plan.manifest, "source": plan.source, "drift": plan.drift, "note": plan.note,
            "builds": [s.model_dump(mode="json") for s in plan.builds.steps],
            "hosts": [{"target": h.target, "url": h.url, "error": h.error, "warnings": h.warnings,
                       "upload_bytes": plan.upload_bytes(h),
                       "actions": [a.model_dump(mode="json") for a in plan.actions(h)]} for h in plan.hosts],
            "registry": plan.registry.model_dump(mode="json") if plan.registry else None}


def registry_line(plan: DeployPlan) -> str | None:
    """One line on the registry: where, whether hosts can pull from it, what is not known yet."""
    registry = plan.registry
    if registry is None:
        return None
    if registry.problem:
        return registry.problem + ("" if registry.publish else " (no host needs a pull now)")
    state = "anonymous reads, blob answers with Location" if registry.location_header else "anonymous reads"
    return f"registry {registry.url} ({registry.repository}): {state}" + (f"; {registry.note}" if registry.note
                                                                         else "")


def print_deploy_plan(plan: DeployPlan, fmt: str) -> None:
    if fmt == "json":
        print_json(plan_summary(plan))
        return
    if fmt == "markdown":
        console.out(plan_markdown(plan), highlight=False)
        return
    steps = [(s.variant, s.stage, s.quant or "-", (s.key or "unknown")[:16], "cached" if s.cached else
              (s.note or "to build")) for s in plan.builds.steps]
    print_table(f"Build ({plan.source})", ["variant", "step", "type", "key", "state"], steps)
    if (line := registry_line(plan)) is not None:
        console.print(escape(line), style="red" if plan.registry and plan.registry.problem else None)
        rows = [(a.kind, a.tag, a.detail, human_size(a.bytes) if a.bytes != 0 else "") for a in plan.publish_rows()]
        if rows:
            print_table("registry: publish once, before any host pulls", ["action", "tag", "detail", "bytes"], rows)
    for host in plan.hosts:
        if host.error:
            console.print(f"[bold]{host.target}[/bold] ({host.url}): [red]{escape(host.error)}[/red]")
            continue
        rows = [(a.kind, a.tag, a.detail, human_size(a.bytes) if a.bytes != 0 else "") for a in plan.actions(host)]
        print_table(f"{host.target} ({host.url})", ["action", "tag", "detail", "bytes"], rows)


def markdown_text(text: str) -> str:
    """Server-made text (a host's error) as inert Markdown on one line: no table cell ends early, no HTML,
    link, image, code span or emphasis comes from it."""
    flat = " ".join(str(text).split())
    return "".join(f"\\{ch}" if ch in "\\`*_[]()<>|!#~&" else ch for ch in flat)


def plan_markdown(plan: DeployPlan) -> str:
    """A summary fit for a pull-request comment."""
    name = plan.tags[0].tag.split(":")[0] if plan.tags else plan.manifest
    to_build = [s for s in plan.builds.steps if not s.cached]
    lines = [f"### so8t-deploy plan: `{name}`", ""]
    hosts = f"{len(plan.hosts)} host" + ("" if len(plan.hosts) == 1 else "s")
    lines.append(f"**{'Changes' if plan.drift else 'No changes'}** on {hosts}; "
                 f"{len(to_build)} of {len(plan.builds.steps)} build steps to run (source `{plan.source}`).")
    if plan.note:
        lines += ["", f"Some keys are unknown: {markdown_text(plan.note)}."]
    if (line := registry_line(plan)) is not None:
        published = [f"`{a.tag}` ({human_size(a.bytes)})" for a in plan.publish_rows()]
        lines += ["", markdown_text(line) + (f"; publish {', '.join(published)}" if published else "") + "."]
    # A host uploads in push mode and pulls in registry mode: the first column says which.
    kinds = ("pull" if plan.registry is not None else "upload", "create", "verify", "unchanged", "held", "tidy",
             "delete")
    lines += ["", "| host | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for host in plan.hosts:
        if host.error:
            cells = [markdown_text(host.target), f"host error: {markdown_text(host.error)}", *[""] * 6]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        done = [str(a.kind) for a in plan.actions(host)]
        first = str(done.count("pull")) if plan.registry is not None else human_size(plan.upload_bytes(host))
        counts = [str(done.count(k)) for k in kinds[1:]]
        lines.append(f"| {host.target} | {first} | " + " | ".join(counts) + " |")
    changes = [(h.target, a) for h in plan.hosts for a in plan.actions(h) if a.kind != "unchanged"]
    if changes:
        lines += ["", "<details><summary>Actions</summary>", ""]
        lines += [f"- `{target}` **{a.kind}** `{a.tag}` {markdown_text(a.detail)}".rstrip() for target, a in changes]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


# -- build, smoke, apply, quality --------------------------------------------------------------------------

def print_build_report(report: BuildReport, *, as_json: bool) -> None:
    if as_json:
        print_json({"built": report.built, "reused": report.reused,
                    "artifacts": [{"tag": a.tag, "variant": a.variant, "quant": a.quant, "path": str(a.path),
                                   **a.record.model_dump(mode="json")} for a in report.artifacts]})
        return
    rows = [(a.tag, human_size(a.size), f"{a.bits_per_weight:.2f}", a.sha256[:16]) for a in report.artifacts]
    print_table("Build (--json has each file's path)", ["tag", "size", "bpw", "sha256"], rows)
    if report.built == 0:
        console.print(f"nothing to rebuild: all {report.reused} steps are up to date")
    else:
        console.print(f"built {report.built} steps, reused {report.reused}")


def print_smoke_results(results: Sequence[SmokeResult], *, as_json: bool) -> None:
    if as_json:
        print_json([dataclasses.asdict(r) for r in results])
        return
    rows = [(r.host, r.tag, _shortened(r.prompt), "pass" if r.passed else "FAIL", r.reason,
             f"{r.tokens_per_second:.1f}" if r.kind == "prompt" else "-",
             f"{r.seconds:.2f}" if r.kind == "prompt" else "-") for r in results]
    print_table("Smoke tests", ["host", "tag", "check", "result", "reason", "tokens/s", "seconds"], rows)


def _shortened(text: str, limit: int = 48) -> str:
    line = text.splitlines()[0] if text.strip() else text
    return line if len(line) <= limit and line == text else line[:limit - 3] + "..."


def print_apply_result(result: ApplyResult, *, as_json: bool) -> None:
    if as_json:
        print_json({"build": {"built": result.build.built, "reused": result.build.reused},
                    "gated": result.gated, "forced": result.forced,
                    "published": dataclasses.asdict(result.published) if result.published else None,
                    "hosts": [dataclasses.asdict(h) | {"outcome": h.outcome} for h in result.hosts]})
        return
    if result.build.built:
        console.print(f"build: built {result.build.built} steps, reused {result.build.reused}")
    if (published := result.published) is not None:
        console.print(f"registry {published.registry}: published {len(published.published)} tags "
                      f"({human_size(published.pushed_bytes)} pushed), {len(published.present)} already there")
    smoke = [r for h in result.hosts for r in h.smoke]
    if smoke:
        print_smoke_results(smoke, as_json=False)
    rows = [(h.target, h.status, h.outcome, human_size(h.uploaded_bytes), _tag_counts(h), h.error or "")
            for h in result.hosts]
    print_table("Rollout", ["host", "status", "host state", "uploaded", "tags", "error"], rows)


def _tag_counts(host: HostReport) -> str:
    counts = {"created": host.created, "pulled": host.pulled, "verified": host.verified, "promoted": host.promoted,
              "unchanged": host.unchanged, "held": host.held, "tidied": host.tidied, "deleted": host.deleted,
              "rolled back": host.rolled_back}
    return ", ".join(f"{len(tags)} {what}" for what, tags in counts.items() if tags) or "-"


def print_quality(results: Sequence[QuantQuality], manifest: Manifest, *, as_json: bool) -> None:
    from ..quality.evaluate import gate_failures

    verdicts = [gate_failures(manifest, r) for r in results]
    if as_json:
        print_json([dataclasses.asdict(r) | {"gate": v} for r, v in zip(results, verdicts, strict=True)])
        return
    with_imatrix = manifest.quantize.imatrix is not None
    rows = []
    for r, v in zip(results, verdicts, strict=True):
        without = [_or_dash(r.without_mean_kl, ".5f"), _or_dash(r.without_top1, ".3f")] if with_imatrix else []
        rows.append((r.tag, r.reference, f"{r.mean_kl:.5f}", f"{r.p99_kl:.5f}", f"{r.top1:.3f}", *without,
                     f"{r.perplexity:.2f}", human_size(r.size), f"{r.bits_per_weight:.2f}",
                     f"{r.tokens_per_second:.0f}", "; ".join(v) or ("pass" if manifest.quality.gated else "-")))
    columns = ["tag", "vs", "mean KL", "p99 KL", "top-1", *(["KL w/o imatrix", "top-1 w/o"] if with_imatrix else []),
               "ppl", "size", "bpw", "tokens/s", "gate"]
    print_table("Quality", columns, rows)


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
