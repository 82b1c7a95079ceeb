"""Rollout: what each host should hold, and getting it there blue/green per tag, all or nothing, canary first.

- `desired`, `render`: each tag's model and Modelfile (from the manifest and the build plan);
- `host_plan`: observe a host and decide what each desired tag needs (pure; plan saves it);
- `host_apply`: execute one host's decisions: candidates, smoke tests, promotion, rollback;
- `fleet`: observing every host, canaries, parallelism and the failure policy across hosts;
- `records`: a local cache of what this workspace verified on each host (never the truth about one);
- `smoke`: the smoke tests.
"""
