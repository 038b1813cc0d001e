"""Benchmarks: sbg against a direct connection, nginx and mitmproxy.

`python -m bench.run` (or `make bench`) installs what it needs, starts every
server on loopback, runs the workloads interleaved and prints one table per
workload. See docs/performance.md.
"""
