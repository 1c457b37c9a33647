"""JAX's persistent compilation cache for unclip-jax: compiled sampling loops are written to disk and a
later process with the same configuration loads them instead of compiling again.

    import unclip_jax as uj
    uj.enable_compilation_cache()          # before the first compilation; the folder below
    uj.enable_compilation_cache("/fast/disk/jax-cache")

The folder is $UNCLIP_JAX_CACHE_DIR when that is set (set to the empty string: no cache), else
$XDG_CACHE_HOME/unclip-jax/jax, else ~/.cache/unclip-jax/jax. The `unclip-jax` command turns it on by
default (`--no-compile-cache` turns it off).

The same call also keeps, in the subfolder `abstract/`, each model's abstract param tree (paths, shapes
and dtypes as JSON; `weights.convert.abstract_params`), so that a later process checks and loads params
without tracing every model's init again.
"""

from __future__ import annotations

import os

import jax

CACHE_DIR_ENV = "UNCLIP_JAX_CACHE_DIR"
# Programs that compile faster than this are not written. The tiny pipelines' loops compile in about a
# second on a CPU; the little eager programs around them in a few milliseconds, which also add up.
_MIN_COMPILE_SECONDS = 0.0


def default_cache_dir() -> str | None:
    """The cache folder the environment asks for; None when UNCLIP_JAX_CACHE_DIR is set empty."""
    if CACHE_DIR_ENV in os.environ:
        return os.environ[CACHE_DIR_ENV] or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unclip-jax", "jax")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in `path` (default: `default_cache_dir()`), creating the
    folder; returns it, or None when the environment turns the cache off. Call it before the first
    compilation: JAX reads the setting once per process."""
    folder = default_cache_dir() if path is None else os.fspath(path)
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    # JAX's cache reads only its own `*-cache` files, so a subfolder beside them is left alone.
    from unclip_jax.weights.convert import keep_abstract_trees  # noqa: PLC0415  (import time: flax)

    keep_abstract_trees(os.path.join(folder, "abstract"))
    return folder
