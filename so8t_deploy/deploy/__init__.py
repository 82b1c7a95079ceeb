"""The GitOps loop: a typed, saved DeployPlan (build steps, gate verdicts and per-host actions,
computed without side effects) and its execution by apply."""
