"""Rollout: what each host should hold, and getting it there all or nothing, canary first.

- `desired`, `render`: each tag's model and Modelfile (from the manifest and the build plan);
- `host_plan`: observe a host and decide what each desired tag needs (pure; plan saves it);
- `host_apply`: execute one host's decisions with backups, smoke tests and rollback;
- `fleet`: canaries, parallelism and the failure policy across hosts;
- `records`: the local journal of what was created and verified on each host;
- `smoke`: the smoke tests.
"""
