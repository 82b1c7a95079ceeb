"""Rollout: observe each host, decide per tag, and apply all or nothing, canary first.

- `host_plan`: observe a host and decide what each desired tag needs (pure; plan shows it);
- `host_apply`: execute one host's decisions with backups, smoke tests and rollback;
- `fleet`: canaries, parallelism and the failure policy across hosts;
- `records`: the local journal of what was created and verified on each host.
"""

from .fleet import apply_rollout, plan_hosts
from .host_apply import HostReport, HostStatus, connect
from .host_plan import Action, ActionKind, HostPlan

__all__ = ["Action", "ActionKind", "HostPlan", "HostReport", "HostStatus", "apply_rollout", "connect", "plan_hosts"]
