"""Resolving a pipeline argument: a local folder, or a hub repo id through huggingface_hub's cache.

Online, the repo's file listing decides what to fetch (`select_files`): model_index.json, each needed
component's configs, tokenizer and processor files, and one weight set per model component, chosen as
the loader will choose it (safetensors first, the `variant` where a component has it). Offline
(`local_files_only`, or HF_HUB_OFFLINE=1) the cached snapshot of `revision` is used as it is, as in
diffusers; an unreachable hub also falls back to the cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import huggingface_hub
from huggingface_hub import constants, errors

from unclip_jax.weights.checkpoint import is_aux_file, pipeline_weight_sets
from unclip_jax.weights.errors import CheckpointError

_REPO_ID = re.compile(r"[\w.\-]+(/[\w.\-]+)?")


def select_files(filenames: Iterable[str], components: Iterable[str], variant: str | None = None,
                 where: str = "repo") -> list[str]:
    """The files of a repo listing that a pipeline with `components` needs, sorted.

    Never .msgpack, .ckpt, .onnx, .pb, .h5 or other variants' weights; a .bin only for a component with
    no safetensors. Raises CheckpointError when `variant` is given and no component has it.
    """
    by_component: dict[str, list[str]] = {}
    filenames = list(filenames)
    for name in filenames:
        folder, _, base = name.partition("/")
        if base and "/" not in base:
            by_component.setdefault(folder, []).append(base)
    wanted = {c: by_component.get(c, []) for c in components}
    chosen = pipeline_weight_sets(wanted, variant, where)
    out = {"model_index.json"} & set(filenames)
    for component, names in wanted.items():
        out |= {f"{component}/{n}" for n in names if is_aux_file(n)}
        if component in chosen:
            out |= {f"{component}/{n}" for n in chosen[component].files}
    return sorted(out)


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and not text.startswith(".") and ".." not in text


def looks_like_path(text: str) -> bool:
    """Whether `text` is meant as a local path: it starts with `.`, `~` or a separator, has more
    separators than a repo id's one, a backslash, or names a file or a folder's first part that exists."""
    if text.startswith((".", "~", os.sep)) or "\\" in text or text.count("/") > 1 or os.path.lexists(text):
        return True
    return ("/" in text and os.path.isdir(text.split("/")[0])) or not is_repo_id(text)


def resolve(path_or_repo_id: str, components: tuple[str, ...], *, variant: str | None = None,
            revision: str | None = None, local_files_only: bool = False, cache_dir: str | None = None) -> str:
    """A local pipeline folder for `path_or_repo_id` (a folder is returned as is).

    A path-like value (see `looks_like_path`) that is no folder is an error at once, never a hub id.
    Offline (`local_files_only` or HF_HUB_OFFLINE=1) only the cache is read: nothing is retried.

    Args:
      components: the pipeline components to fetch (others in the repo are left out).
      variant: e.g. "fp16" for `*.fp16.safetensors` weights.
      revision: a branch, tag or commit hash (default: "main").
      local_files_only: use huggingface_hub's cache only (also implied by HF_HUB_OFFLINE=1).
      cache_dir: huggingface_hub's cache folder (default: its own, e.g. ~/.cache/huggingface/hub).
    """
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if looks_like_path(path_or_repo_id):
        what = "not a pipeline folder" if os.path.lexists(path_or_repo_id) else "no such pipeline folder"
        raise CheckpointError(f"{path_or_repo_id}: {what} (a local path: not looked up on the hub)")
    repo, at = path_or_repo_id, f" at revision {revision!r}" if revision else ""
    allow = None
    if not (local_files_only or constants.is_offline_mode()):
        try:
            listing = huggingface_hub.HfApi().list_repo_files(repo, revision=revision)
            allow = select_files(listing, components, variant, where=f"{repo}{at}")
        except CheckpointError:
            raise
        except errors.RevisionNotFoundError as e:
            raise CheckpointError(f"{repo}: no revision {revision!r} on the hub") from e
        except errors.RepositoryNotFoundError as e:
            raise CheckpointError(f"{repo}: not a local folder, and no such repo on the hub (or no access)") from e
        except Exception:  # noqa: BLE001  (connection, proxy, server errors: many kinds)
            allow = None  # as diffusers does: an unreachable hub means "use the cache"
    try:
        folder = huggingface_hub.snapshot_download(
            repo, revision=revision, cache_dir=cache_dir, local_files_only=allow is None,
            allow_patterns=allow or ["model_index.json"],
        )
    except Exception as e:  # noqa: BLE001  (the hub raises many kinds; all mean "cannot resolve")
        where = "in the local cache" if allow is None else "on the hub"
        raise CheckpointError(f"{repo}: not a local folder, and not found {where}{at} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise CheckpointError(f"{repo}{at}: the cached snapshot has no model_index.json (not a diffusers pipeline)")
    return folder
