"""Controller egress for a fleet, push mode against registry mode: the first rollout and a no-op re-apply.

Starts a real registry (Debian's docker-registry) and N Ollama-compatible test servers on loopback (tests/, each
running the GGUFs with llama.cpp), every one behind a byte-counting TCP proxy that the manifest names, then
applies the demo model's ladder with `distribution: push` to N fresh hosts and with `distribution: registry` to
N other fresh hosts, and applies each again. It prints, per mode and run, what the controller sent to the hosts
and to the registry, and the ratios: registry mode / push mode (the baseline, measured in the same run), and
registry mode against the ladder's own size (1.0 is "the ladder once").

    .venv/bin/python benchmarks/fleet_egress.py [--hosts 20] [--workdir DIR]

The registry's proxy also carries the hosts' pull requests (a few hundred bytes each), never the pulled bytes,
which flow the other way: its count is an upper bound of what the controller sent there.
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

from tests.idle_proxy import CountingProxy  # noqa: E402 - the repository's own test helpers
from tests.ollama_server import ServerPool  # noqa: E402
from tests.registry import Registry  # noqa: E402

MANIFEST = """\
apiVersion: so8t-deploy/v1
name: egress-bench
source:
  model: {demo}/model
  adapters: [{{kind: so8t, path: {demo}/adapters/so8t}}]
quantize: [f16, q8_0]
modelfile: {{system: "You are a helpful assistant.", parameters: {{num_ctx: 512}}}}
targets:
{targets}
rollout: {{canary: 1, parallelism: 8}}
smoke:
  - {{prompt: "Say hello.", expect: ".", timeout_s: 120}}
{distribution}
"""


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def apply(manifest: Path, cache: Path) -> tuple[float, dict]:
    cli = str(Path(sys.executable).with_name("so8t-deploy"))
    started = time.perf_counter()
    proc = subprocess.run([cli, "apply", str(manifest), "--cache-dir", str(cache), "--json"], capture_output=True,
                          text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"apply failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def rollout(mode: str, hosts: int, workdir: Path, demo: Path, cache: Path, registry: CountingProxy) -> dict:
    """First apply and no-op re-apply to `hosts` fresh hosts; bytes the controller sent, per run."""
    pool = ServerPool(workdir / f"hosts-{mode}")
    proxies: list[CountingProxy] = []
    try:
        proxies = [CountingProxy(port(url)) for url in pool.start(hosts)]
        targets = "\n".join(f"  - {{name: host-{i}, host: '{p.url}', timeout_s: 120}}" for i, p in enumerate(proxies))
        distribution = (f"distribution: {{registry: {{url: '{registry.url}', namespace: bench, insecure: true}}}}"
                        if mode == "registry" else "distribution: push")
        manifest = workdir / f"{mode}.yaml"
        manifest.write_text(MANIFEST.format(demo=demo, targets=targets, distribution=distribution))
        runs = {}
        for run in ("first", "noop"):
            for proxy in (registry, *proxies):
                proxy.reset_counts()
            seconds, report = apply(manifest, cache)
            runs[run] = {"seconds": round(seconds, 2), "to_hosts": sum(p.sent for p in proxies),
                         "to_registry": registry.sent if mode == "registry" else 0,
                         "largest_to_one_host": max(p.sent for p in proxies),
                         "converged": sum(h["status"] == "ok" for h in report["hosts"])}
            runs[run]["total"] = runs[run]["to_hosts"] + runs[run]["to_registry"]
        return runs
    finally:
        for proxy in proxies:
            proxy.close()
        pool.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/so8t-bench-egress"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    from so8t_deploy.demo import init_demo

    demo, cache = init_demo(args.workdir / "demo"), args.workdir / "cache"
    with Registry(args.workdir / "registry") as registry:
        registry_proxy = CountingProxy(port(registry.url))
        try:
            push = rollout("push", args.hosts, args.workdir, demo, cache, registry_proxy)
            pulled = rollout("registry", args.hosts, args.workdir, demo, cache, registry_proxy)
        finally:
            registry_proxy.close()
    ladder = sum(p.stat().st_size for p in (cache / "releases" / "egress-bench").rglob("*.gguf"))
    first, base = pulled["first"], push["first"]
    result = {"hosts": args.hosts, "ladder_bytes": ladder, "push": push, "registry": pulled,
              "first_rollout_registry_vs_push": round(first["total"] / base["total"], 4),
              "first_rollout_push_vs_ladder": round(base["total"] / ladder, 2),
              "first_rollout_registry_vs_ladder": round(first["total"] / ladder, 3),
              "registry_bytes_per_host": round(first["to_hosts"] / args.hosts)}
    print(json.dumps(result, indent=2))
    # The ladder once, plus requests: the controller's for small layers and manifests, each host's pull requests.
    once = first["to_registry"] <= ladder + (64 + 16 * args.hosts) * 1024 and first["largest_to_one_host"] < 64 * 1024
    noop = pulled["noop"]["total"] < 64 * 1024 * args.hosts and push["noop"]["total"] < 64 * 1024 * args.hosts
    print(f"first rollout to {args.hosts} hosts: push mode sent {base['total'] / 2**20:.1f} MiB "
          f"({base['total'] / ladder:.1f}x the {ladder / 2**20:.1f} MiB ladder), registry mode "
          f"{first['total'] / 2**20:.2f} MiB ({first['total'] / ladder:.2f}x the ladder, "
          f"{first['total'] / base['total']:.3f}x push mode; "
          f"{first['to_hosts'] / args.hosts / 1024:.1f} KiB per host); "
          f"no-op: {push['noop']['total'] / 1024:.0f} KiB push, {pulled['noop']['total'] / 1024:.0f} KiB registry: "
          f"{'PASS' if once and noop else 'MISS'}")


if __name__ == "__main__":
    main()
