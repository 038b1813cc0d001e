"""The test bed: PKI, configurations and real Synapse homeservers on loopback.

Shared by the test suite (`tests/`), the demo (`demo/`) and the benchmarks
(`bench/`); none of it ships in the package.
"""
