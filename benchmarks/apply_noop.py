"""Re-applying an unchanged manifest: 3 variants x N hosts (3, or --hosts), the second apply must upload nothing.

Starts three Ollama-compatible test servers on loopback (tests/ollama_server/, each running the
GGUFs with llama.cpp), applies a demo manifest with three variants once (build, upload, create,
smoke), then times `so8t-deploy apply` again, in a fresh process as CI would run it. It prints the
no-op time (target: under 2 s in total), the time per host, what the re-run uploaded and created, how
often it listed each host's models (once: the plan's observation is all it needs), and its ratio to
the baseline measured in the same run: `so8t-deploy plan` of the same manifest, which only observes.

    .venv/bin/python benchmarks/apply_noop.py [--workdir DIR] [--hosts N]

Targets: under 2 s in total at 3 hosts, and under 4 s at 50 (`--hosts 50`: every host is observed
once, in parallel, so the no-op should grow with the host count only by what one observation costs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.ollama_server import ServerPool  # noqa: E402 - the repository's own test server

MANIFEST = """\
apiVersion: so8t-deploy/v1
name: noop-bench
source:
  model: {demo}/model
  adapters: [{{kind: so8t, path: {demo}/adapters/so8t}}]
bake:
  variants:
    full: {{}}
    half: {{rotation: 0.5, ffn: 0.5, triality: 0.5}}
    light: {{rotation: 0.1, ffn: 0.05, triality: 0.02}}
quantize: [q8_0]
modelfile: {{system: "You are a helpful assistant.", parameters: {{num_ctx: 512}}}}
targets:
{targets}
rollout: {{canary: 1, parallelism: 3}}
smoke:
  - {{prompt: "Say hello.", expect: ".", timeout_s: 60}}
"""


def run(command: str, manifest: Path, cache: Path) -> tuple[float, dict]:
    cli = str(Path(sys.executable).with_name("so8t-deploy"))
    started = time.perf_counter()
    proc = subprocess.run([cli, command, str(manifest), "--cache-dir", str(cache), "--json"],
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/so8t-bench-apply"))
    parser.add_argument("--hosts", type=int, default=3, help="loopback test servers (default 3; the issue's 50)")
    args = parser.parse_args()
    if args.hosts < 1:
        parser.error("--hosts must be at least 1")
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    from so8t_deploy.demo import init_demo

    demo = init_demo(args.workdir / "demo")
    pool = ServerPool(args.workdir / "hosts")
    try:
        urls = pool.start(args.hosts)
        targets = "\n".join(f"  - {{name: host-{i}, host: '{url}'}}" for i, url in enumerate(urls))
        manifest = args.workdir / "manifest.yaml"
        manifest.write_text(MANIFEST.format(demo=demo, targets=targets))
        cache = args.workdir / "cache"
        first, _ = run("apply", manifest, cache)
        plan, _ = run("plan", manifest, cache)
        for url in urls:
            pool.server(url).clear_requests()
        noop, report = run("apply", manifest, cache)
        requests = [pool.server(url).requests() for url in urls]
        listings = [sum(r["path"] == "/api/tags" for r in host) for host in requests]
    finally:
        pool.stop_all()
    uploaded = sum(h["uploaded_bytes"] for h in report["hosts"])
    created = sum(len(h["created"]) for h in report["hosts"])
    unchanged = sum(len(h["unchanged"]) for h in report["hosts"])
    print(json.dumps({"first_apply_s": round(first, 2), "plan_s": round(plan, 3), "noop_apply_s": round(noop, 3),
                      "noop_vs_plan": round(noop / plan, 2), "noop_per_host_s": round(noop / len(urls), 3),
                      "noop_uploaded_bytes": uploaded, "noop_created": created, "noop_unchanged": unchanged,
                      "noop_listings_per_host": sorted(set(listings)),
                      "noop_requests_per_host": _request_counts(requests)}, indent=2))
    limit = 2.0 if args.hosts <= 3 else 4.0
    verdict = "PASS" if noop < limit and uploaded == 0 and created == 0 and set(listings) == {1} else "MISS"
    print(f"no-op apply of 3 variants x {args.hosts} hosts: {noop:.2f} s (target < {limit:g} s; {noop / plan:.2f}x a "
          f"plan, which "
          f"only observes), {uploaded} bytes uploaded, {created} created, {unchanged} unchanged, each host listed "
          f"{'/'.join(map(str, sorted(set(listings))))} times: {verdict}")


def _request_counts(requests: list[list[dict]]) -> dict[str, list[int]]:
    """Per request kind ("GET /api/tags"), the fewest and most times one host received it."""
    kinds = sorted({f"{r['method']} {r['path']}" for host in requests for r in host})
    counts = {kind: [sum(f"{r['method']} {r['path']}" == kind for r in host) for host in requests] for kind in kinds}
    return {kind: [min(per_host), max(per_host)] for kind, per_host in counts.items()}


if __name__ == "__main__":
    main()
