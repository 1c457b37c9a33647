"""Resolving a pipeline argument: a local folder, or a hub repo id through huggingface_hub's cache."""

from __future__ import annotations

import os

from unclip_jax.weights.safetensors_io import CheckpointError


def allow_patterns(components: tuple[str, ...], variant: str | None) -> list[str]:
    """The files a pipeline needs: configs, tokenizer/processor files, and one set of weights per
    component (safetensors of the variant; no .msgpack/.ckpt/.onnx, no .bin beside safetensors)."""
    patterns = ["model_index.json"]
    for c in components:
        patterns += [f"{c}/*.json", f"{c}/*.txt"]
        patterns += [f"{c}/*.{variant}.safetensors", f"{c}/*.{variant}.safetensors.index.json"] if variant \
            else [f"{c}/*.safetensors"]
    return patterns


def resolve(path_or_repo_id: str, components: tuple[str, ...], *, variant: str | None = None,
            revision: str | None = None, local_files_only: bool = False, cache_dir: str | None = None) -> str:
    """A local pipeline folder for `path_or_repo_id` (a folder is returned as is)."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if os.path.sep in path_or_repo_id.strip("/").replace("/", "", 1) or path_or_repo_id.startswith((".", "/")):
        raise CheckpointError(f"{path_or_repo_id}: no such pipeline folder")
    import huggingface_hub  # noqa: PLC0415

    try:
        return huggingface_hub.snapshot_download(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=allow_patterns(components, variant),
        )
    except Exception as e:  # noqa: BLE001  (the hub raises many kinds; all mean "cannot resolve")
        raise CheckpointError(f"{path_or_repo_id}: not a local folder and not resolvable on the hub ({e})") from e
