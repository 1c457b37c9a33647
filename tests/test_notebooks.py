"""Every notebook under notebooks/ runs headless, top to bottom, on its tiny checkpoints, and draws.

One test per notebook (found by glob, so every notebook added later is run too): executed with nbclient
in a `python3` kernel whose working folder is notebooks/; any cell error fails the test, and at least
one figure (an image/png output) must come out. Notebooks are stored without outputs and must not write
into the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    """One persistent JAX compilation cache for the module's kernels: the notebooks' tiny decoders
    compile the same programs."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if ".ipynb_checkpoints" not in p.parts}


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "variations", "embedding_arithmetic", "depth2img"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    with_outputs = [i for i, c in enumerate(nb.cells)
                    if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not with_outputs, f"{path.name}: cells {with_outputs} hold outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_headless_and_draws(path, compile_cache, monkeypatch):
    # The kernel inherits this environment. Fewer XLA optimisations and a shared compilation cache keep
    # compilation (most of a tiny notebook's time) short; what the notebooks compute is unchanged.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", compile_cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    before = _files(FOLDER)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(FOLDER)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} made no figure"
    assert _files(FOLDER) == before, f"{path.name} wrote into the repository: {_files(FOLDER) - before}"
