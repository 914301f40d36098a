"""Load benchmarks (not tests): run from the repository root as
`python -m bench NAME [ARGS]` (bench/__main__.py lists the names). The entry
points are the modules here; their helpers live in bench/lib. Results and how
to read them: bench/README.md and BENCHMARKS.md."""
