"""Tests of mergeprobe/checkpoints and worker/checkpoints: architectures, header readers, key layouts, test checkpoints."""
