"""Pipeline folders on disk: diffusers' layout (model_index.json + one folder per component).

Reading: the model index, the class of each component, the file listing of each component folder.
Writing: `save_pipeline` (each component's configs, tokenizer and processor files, orbax params) and
`atomic_folder`, through which every folder we write goes: a hidden `.NAME.partial-*` sibling renamed
into place when complete, so a killed or failed write leaves the destination as it was. Overwriting
replaces only a pipeline folder (one with model_index.json); anything else at the destination is
refused before any work, and nothing of the user's is moved or deleted. Also here: where the Karlo
prior's components lie in the checkpoints that have one (`PRIOR_LAYOUTS`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from unclip_jax.weights.checkpoint import is_aux_file
from unclip_jax.weights.errors import CheckpointError
from unclip_jax.weights.orbax_io import ORBAX_DIR, save_params

MODEL_INDEX = "model_index.json"
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")

# The prior of StableUnCLIPPipeline (our component names) in the checkpoints that carry one: Karlo's
# UnCLIPPipeline (e.g. kakaobrain/karlo-v1-alpha) names them as a text-to-image pipeline does.
KARLO = "kakaobrain/karlo-v1-alpha"
PRIOR_COMPONENTS = ("prior_tokenizer", "prior_text_encoder", "prior", "prior_scheduler")
PRIOR_LAYOUTS = {
    "UnCLIPPipeline": dict(zip(PRIOR_COMPONENTS, ("tokenizer", "text_encoder", "prior", "prior_scheduler"))),
    "StableUnCLIPPipeline": dict(zip(PRIOR_COMPONENTS, PRIOR_COMPONENTS)),
}


def read_model_index(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MODEL_INDEX)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such pipeline folder")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing (not a diffusers pipeline folder)") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def write_model_index(folder: str, index: dict[str, Any]) -> None:
    with open(os.path.join(folder, MODEL_INDEX), "w") as f:
        json.dump(index, f, indent=2)


def component_class(index: dict, name: str, folder: str) -> str | None:
    """The class model_index.json gives component `name` (None: an optional component saved as absent)."""
    entry = index.get(name)
    if entry is None:
        raise CheckpointError(f"{folder}/{MODEL_INDEX}: names no component {name!r}")
    return entry[1]


def component_listing(folder: str, names) -> dict[str, list[str]]:
    """component -> the file names in its sub-folder of `folder` (empty when absent)."""
    return {n: sorted(os.listdir(os.path.join(folder, n))) if os.path.isdir(os.path.join(folder, n)) else []
            for n in names}


def prior_layout(folder: str) -> dict[str, str]:
    """StableUnCLIPPipeline's prior components -> their names in the pipeline folder `folder`."""
    found = read_model_index(folder).get("_class_name")
    if found not in PRIOR_LAYOUTS:
        raise CheckpointError(f"{folder}: a {found} has no prior; give a {' or a '.join(PRIOR_LAYOUTS)} "
                              f"(e.g. {KARLO})")
    return PRIOR_LAYOUTS[found]


def copy_aux_files(src: str, dst: str) -> None:
    """Copies a component folder's configs, tokenizer and processor files (no weights)."""
    for fname in sorted(os.listdir(src)):
        if is_aux_file(fname) and os.path.isfile(os.path.join(src, fname)):
            shutil.copy2(os.path.join(src, fname), dst)


def is_pipeline_folder(path: str) -> bool:
    """A real folder (not a link) holding a model_index.json: what `overwrite` may replace."""
    return os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(os.path.join(path, MODEL_INDEX))


def check_destination(folder: str, *, overwrite: bool = False, flag: str = "overwrite=True") -> None:
    """Raises FileExistsError unless a pipeline folder may be written at `folder`: it must not exist
    or, with `overwrite`, be a pipeline folder. Called before any work, and again just before the swap.
    `flag` is how the caller's user asks to overwrite, for the message."""
    if not os.path.lexists(folder):
        return
    if not overwrite:
        raise FileExistsError(f"{folder}: already exists (pass {flag} to replace it)")
    if not is_pipeline_folder(folder):
        kind = ("a link" if os.path.islink(folder) else "a file" if os.path.isfile(folder)
                else "a folder without model_index.json" if os.path.isdir(folder) else "not a folder")
        raise FileExistsError(f"{folder}: exists and is {kind}; only a pipeline folder is overwritten "
                              "(choose another destination, or move it away yourself)")


def _partial_prefix(folder: str) -> str:
    return f".{os.path.basename(folder)}.partial-"


def remove_stale_partials(folder: str) -> list[str]:
    """Removes the hidden `.NAME.partial-*` folders that killed writes to `folder` left beside it
    (not those of a write still running); returns the paths removed."""
    parent, prefix = os.path.dirname(folder), _partial_prefix(folder)
    removed = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else ():
        path = os.path.join(parent, entry)
        if not entry.startswith(prefix) or os.path.islink(path) or not os.path.isdir(path):
            continue
        pid = re.match(r"(\d+)-", entry[len(prefix):])
        if pid and _alive(int(pid.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths in one step


def _exchange(a: str, b: str) -> bool:
    """Swaps two existing paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_folder(folder: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary folder beside `folder`, renamed to `folder` when the block succeeds.

    `folder` must not exist or, with `overwrite`, be a pipeline folder (`check_destination`, before
    the block runs). An interrupted or failed write leaves `folder` as it was: the partial folder is
    a hidden `.NAME.partial-<pid>-*` sibling, removed by the next write to `folder`. An overwritten
    pipeline folder is swapped for the new one in one atomic step where the system allows it (Linux),
    else moved aside just before the new one is renamed in. The folder's mode follows the umask.
    """
    folder = os.path.abspath(folder)
    check_destination(folder, overwrite=overwrite)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(folder)
    tmp = tempfile.mkdtemp(prefix=f"{_partial_prefix(folder)}{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
    try:
        yield tmp
        if not os.path.lexists(folder):
            os.rename(tmp, folder)
        else:
            check_destination(folder, overwrite=overwrite)  # it may have changed while we wrote
            if not _exchange(tmp, folder):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=parent)
                os.rename(folder, os.path.join(old, "content"))
                os.rename(tmp, folder)
                shutil.rmtree(old)
            # After an exchange, `tmp` holds the replaced pipeline folder: removed below.
    finally:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)


def save_pipeline(
    folder: str,
    source: str | dict[str, str],
    index: dict[str, Any],
    components: dict[str, Any],
    params: dict[str, Any],
    *,
    overwrite: bool = False,
    write_params: Callable[[str, Any], None] | None = None,
) -> None:
    """Writes a pipeline folder: model_index.json, each component's config files copied from `source`
    (a pipeline folder, or a component folder per name; tokenizers and schedulers write their own), and
    each model's params as orbax. Written through `atomic_folder`, so a failed save leaves nothing
    half-written at `folder`; `overwrite` replaces an existing pipeline folder (only that).
    `write_params(component_folder, params)` writes a model's params in another format (weights/export.py)."""
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        index = dict(index)
        for name, comp in components.items():
            sub = os.path.join(tmp, name)
            src = source[name] if isinstance(source, dict) else os.path.join(source, name)
            os.makedirs(sub)
            if hasattr(comp, "create_state"):  # a scheduler, maybe swapped: write its own config
                config = {"_class_name": type(comp).__name__, **dataclasses.asdict(comp.config)}
                with open(os.path.join(sub, "scheduler_config.json"), "w") as f:
                    json.dump(config, f, indent=2)
                index[name] = ["diffusers", type(comp).__name__]
            elif hasattr(comp, "save_pretrained") and (type(comp).__name__.startswith(TOKENIZER_CLASSES)
                                                        or not os.path.isdir(src)):
                # Tokenizers write themselves: textual inversion may have added tokens since loading.
                comp.save_pretrained(sub)
            elif os.path.isdir(src):
                copy_aux_files(src, sub)
                sync_vocab_size(sub, comp)
            if name in params and write_params is not None:
                write_params(sub, params[name])
            elif name in params:
                save_params(os.path.join(sub, ORBAX_DIR), params[name])
        write_model_index(tmp, index)


def sync_vocab_size(folder: str, module) -> None:
    """A text encoder grown by textual inversion keeps its copied config.json in step with its params."""
    size = getattr(getattr(module, "config", None), "vocab_size", None)
    path = os.path.join(folder, "config.json")
    if size is None or not os.path.isfile(path):
        return
    with open(path) as f:
        config = json.load(f)
    section = config.get("text_config", config) if "vocab_size" not in config else config
    if section.get("vocab_size", size) != size:
        section["vocab_size"] = size
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
