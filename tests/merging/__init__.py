"""Tests of mergeprobe/merging and worker/merging: methods, plans, grammars, the merge executor."""
