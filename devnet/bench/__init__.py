"""Benchmarks: scripts that print a table; ratios are measured side by side in one run."""

# Before any benchmark imports torch (and with it numpy): OpenBLAS's idle timeout, so the
# single-process engine gets the same one-row products as the nodes (`sharding/_openblas.py`).
import sharding._openblas  # noqa: F401
