"""Real offline benchmark: fine-tune a pretrained encoder on text tasks given as data, merge the
fine-tunes with every method through the hosts' code paths, evaluate, and report.

See ``pave_plugins.bench.harness`` and the README section "Benchmarks".
"""
