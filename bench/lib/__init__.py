"""The benchmarks' helpers (no entry points): server processes and wrk runs
(common.py), the cluster benchmark's nodes, sections, loader, report and
profiler, and the etcd reference."""
