"""devnet: the local multi-process network, its scenarios, and the benchmarks."""
