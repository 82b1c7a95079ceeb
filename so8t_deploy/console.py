"""Human and machine output for commands: rich tables on a terminal, JSON with --json."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .plan import VariantPlan

if TYPE_CHECKING:
    from .build import BuildReport
    from .deploy import ApplyResult
    from .manifest import Manifest
    from .quality import QuantQuality
    from .rollout import HostPlan
    from .smoke import SmokeResult

# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def print_json(data: object) -> None:
    console.out(json.dumps(data, indent=2, default=str), highlight=False)


@contextmanager
def byte_progress(label: str, total: int | None = None) -> Iterator[Callable[[int], None] | None]:
    """A rich byte-progress bar on a terminal; nothing (None callback) when output is piped."""
    if not sys.stderr.isatty():
        yield None
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(f"[bold]{label}", *columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


class ConsoleProgress:
    """The CLI's `Progress`: step lines and warnings on stderr, byte bars on a terminal.

    Concurrent uploads share one live display (rich allows one per console); piped output gets
    the lines only, so --json on stdout stays clean.
    """

    def __init__(self) -> None:
        self._err = Console(stderr=True, highlight=False)
        self._bars: Progress | None = None

    def __enter__(self) -> ConsoleProgress:
        if sys.stderr.isatty():
            columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
            self._bars = Progress("{task.description}", *columns, console=self._err)
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def step(self, message: str) -> None:
        self._err.print(f"[bold]>[/bold] {escape(message)}")

    def warning(self, message: str) -> None:
        self._err.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}")

    def transfer(self, label: str, total: int) -> Callable[[int], None] | None:
        if self._bars is None:
            return None
        bars, task = self._bars, self._bars.add_task(label, total=total)
        return lambda n: bars.advance(task, n)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def print_build_plan(builds: Sequence[VariantPlan], *, as_json: bool) -> None:
    if as_json:
        print_json(
            [
                {**dataclasses.asdict(b), "scales": b.scales.as_dict(),
                 "quants": [dataclasses.asdict(q) for q in b.quants]}
                for b in builds
            ]
        )
        return
    rows = []
    for build in builds:
        scales = ", ".join(f"{k}={v:g}" for k, v in build.scales.as_dict().items())
        rows.append((build.variant, "-", f"bake ({scales})", build.baked_dir))
        rows.append((build.variant, "-", f"convert {build.convert_type}", build.convert_gguf))
        for quant in build.quants:
            source = "(converted)" if quant.quant == build.convert_type else f"quantize {quant.quant}"
            rows.append((build.variant, quant.tag, source, quant.gguf))
    print_table("Build plan (offline)", ["variant", "tag", "step", "artifact"], rows)


def step_logger() -> Callable[[str], None]:
    """Progress lines for long steps, on stderr so --json output stays clean."""
    err = Console(stderr=True, highlight=False)
    return lambda message: err.print(f"[bold]>[/bold] {escape(message)}")


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return str(size)


def print_build_report(report: BuildReport, *, as_json: bool) -> None:
    if as_json:
        print_json({"built": report.built, "reused": report.reused,
                    "artifacts": [{**dataclasses.asdict(a), "path": str(a.path)} for a in report.artifacts]})
        return
    rows = [(a.tag, a.path, _human_size(a.size), f"{a.bits_per_weight:.2f}", a.sha256[:16])
            for a in report.artifacts]
    print_table("Build", ["tag", "file", "size", "bpw", "sha256"], rows)
    if report.built == 0:
        console.print(f"nothing to rebuild: all {report.reused} steps are up to date")
    else:
        console.print(f"built {report.built} steps, reused {report.reused}")


def host_plan_json(plan: HostPlan) -> dict:
    return {"target": plan.target, "url": plan.url, "error": plan.error, "warnings": plan.warnings,
            "drift": plan.drift, "upload_bytes": plan.upload_bytes,
            "actions": [dataclasses.asdict(a) for a in plan.actions]}


def print_host_plans(plans: Sequence[HostPlan], *, as_json: bool) -> None:
    if as_json:
        print_json([host_plan_json(p) for p in plans])
        return
    for plan in plans:
        if plan.error:
            console.print(f"[bold]{plan.target}[/bold] ({plan.url}): [red]{escape(plan.error)}[/red]")
            continue
        rows = [(a.kind, a.tag, a.detail, _human_size(a.bytes) if a.bytes else "") for a in plan.actions]
        print_table(f"{plan.target} ({plan.url})", ["action", "tag", "detail", "bytes"], rows)


def print_smoke_results(results: Sequence[SmokeResult], *, as_json: bool) -> None:
    if as_json:
        print_json([dataclasses.asdict(r) for r in results])
        return
    rows = [(r.host, r.tag, "pass" if r.passed else "FAIL", r.reason, f"{r.tokens_per_second:.1f}",
             f"{r.seconds:.2f}") for r in results]
    print_table("Smoke tests", ["host", "tag", "result", "reason", "tokens/s", "seconds"], rows)


def print_apply_result(result: ApplyResult, *, as_json: bool) -> None:
    if as_json:
        print_json({"build": {"built": result.build.built, "reused": result.build.reused},
                    "gated": result.gated, "forced": result.forced,
                    "hosts": [dataclasses.asdict(h) | {"outcome": h.outcome} for h in result.hosts]})
        return
    if result.build.built:
        console.print(f"build: built {result.build.built} steps, reused {result.build.reused}")
    for tag, reasons in result.gated.items():
        console.print(f"[bold red]quality gate[/bold red]: {tag} is not rolled out: {'; '.join(reasons)}")
    for tag, reasons in result.forced.items():
        console.print(f"[bold red]--force[/bold red]: rolling out {tag} although it fails the quality gate: "
                      f"{'; '.join(reasons)}")
    smoke = [r for h in result.hosts for r in h.smoke]
    if smoke:
        print_smoke_results(smoke, as_json=False)
    rows = [(h.target, h.status, h.outcome, _human_size(h.uploaded_bytes), len(h.created), len(h.unchanged),
             len(h.deleted), ", ".join(h.rolled_back) or "-", h.error or "") for h in result.hosts]
    print_table("Rollout", ["host", "status", "host state", "uploaded", "created", "unchanged", "deleted",
                            "rolled back", "error"], rows)


def print_quality(results: Sequence[QuantQuality], manifest: Manifest, *, as_json: bool) -> None:
    if as_json:
        print_json([dataclasses.asdict(r) | {"gate": r.gate_failures(manifest)} for r in results])
        return
    rows = [(r.tag, r.reference, f"{r.mean_kl:.5f}", f"{r.p99_kl:.5f}", f"{r.top1:.3f}", f"{r.perplexity:.2f}",
             _human_size(r.size), f"{r.bits_per_weight:.2f}", f"{r.tokens_per_second:.0f}",
             "; ".join(r.gate_failures(manifest)) or ("pass" if manifest.quality.gated else "-"))
            for r in results]
    print_table("Quality", ["tag", "vs", "mean KL", "p99 KL", "top-1", "ppl", "size", "bpw", "tokens/s", "gate"],
                rows)
