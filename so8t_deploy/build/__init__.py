"""Building the GGUFs: the plan of build steps and their cache keys, the workspace that owns every path
under --cache-dir (artifacts, digests, locks, host records, releases, hub downloads, the converter), the
runners that execute a step (in-process or in a worker container) and the provenance every artifact
carries."""
