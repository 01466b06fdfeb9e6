"""Tests of mergeprobe/service, worker/ and the CLI: job kinds and store, workers, faults, packaging, deployment."""
