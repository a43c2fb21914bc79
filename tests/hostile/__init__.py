"""Hostile-input suite: generated attack files run through the CLI and the in-process loaders.

`generators` writes each hostile input, `harness` runs the CLI on it under a timeout and an
address-space cap, `test_corpus` and `test_fuzz` assert that nothing runs, crashes or hangs.
"""
