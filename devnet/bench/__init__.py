"""Benchmarks: scripts that print a table; ratios are measured side by side in one run."""
