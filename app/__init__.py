"""kvstore: a distributed key-value store with consistent hashing.

Layers (enforced by import-linter, see pyproject.toml):
web -> cluster -> {transport, discovery} -> storage -> {ring, clock} -> {errors, config}.
"""

__version__ = "0.2.0"
