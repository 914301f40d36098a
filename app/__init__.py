"""kvstore: a distributed key-value store with consistent hashing.

Layers, top to bottom (enforced by import-linter, see pyproject.toml):
cli -> local_cluster -> web -> cluster -> {transport, membership, metrics} -> coalesce
-> storage -> {ring, clock, access} -> config -> errors.
"""

__version__ = "0.2.0"
