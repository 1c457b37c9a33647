"""Fixtures for the training tests."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tiny_objective, run_tiny


@pytest.fixture
def fast_compile():
    """XLA with most optimisations off while the test compiles (the tiny models' programs compile in a
    fraction of the time; what they compute is the same up to float rounding)."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
