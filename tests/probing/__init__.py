"""Tests of mergeprobe/probing and worker/probing: dump and sweep requests, pipelines, probes, renderers."""
