"""Reproduces the default (toy-domain) model of issue 18: datasets, then every training stage, in order.

    python scripts/train_default_model.py --work WORK [--seed 0] [--only STAGE ...] [--dry-run] [--ship]

Every training stage runs `unclip-jax train OBJECTIVE` (issue 17's machinery; the `vae` and `dpt`
objectives were added for this model). The shipped weights came from one run of this script with the
step counts below on this project's 2-core CPU machine: at most 6,984 s (116 min) in all, within issue 18's
2 hours (WORK/timings.json has each stage's seconds; the decoder and depth stages ran in legs continued with
--resume, which resumes bit-exactly, and two legs shared the cores; the variation stage was added after
the others had run, and continued the same working folder: unclip_jax/toy/README.md).
`--scale 0.002` is a smoke run of every stage in ~6 minutes.

Stages (each resumable: a stage whose output exists is skipped; `--only` runs the named ones):

  data      WORK/data/shapes (16,384 flat pictures), WORK/data/depth (4,096 depth scenes, .npy maps),
            WORK/data/heldout (512 flat pictures of the held-out combinations, for evaluation only)
  init      WORK/stage: the random-weight initial folders (unclip_jax.toy.init.write_initial)
  clip      contrastive CLIP on the shapes: StableUnCLIPImg2ImgPipeline's text_encoder and image_encoder;
            then the text tower is copied into the prior's text encoder (identity projection: the text
            width is the embedding width) and the depth model's (init.tie_text_encoders)
  stats     the image normalizer's and the prior's embedding mean/std from 4,096 pictures
            (init.set_embedding_stats)
  vae       the VAE on the shapes, its latents shaped; then their scaling factor (1 / std)
  prior     the prior on the shapes (CLIP text -> CLIP image embedding)
  decoder   the unCLIP decoder on the shapes (noise-augmented image embedding + text)
  variation the decoder again (objective `decoder`, WORK/runs/variation), with text dropout 0.5: with no
            prompt, as variations are sampled, it has only the image embedding
  dpt       the DPT on the depth scenes
  depth     the 5-channel depth decoder on the depth scenes, depth from the data's maps
  export    WORK/export: exactly what the package ships in unclip_jax/toy/weights (unclip_jax.toy.default):
            fp16 WORK/stage/unclip (with the variation pipeline's image encoder) and WORK/stage/depth2img
            without their tokenizer folders (rebuilt from the package's BPE on first use; checked equal
            here), and manifest.json; sizes in WORK/export_sizes.json. --ship copies it into the checkout,
            keeping the shipped files of components that did not change (`keep_unchanged_components`)

After each training stage the components it trained are copied from its `OUT/final` into the working
folders WORK/stage/{unclip,depth2img} (`adopt`), so each stage starts from everything trained before it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# name -> (pipeline folder it starts from, dataset, components it trains, CLI arguments). Steps and batch
# sizes are estimates for <= 2 h in all on 2 CPU cores (seconds per step guessed from the model sizes in
# unclip_jax/toy/init.py; the sum of the estimates is ~95 minutes).
TRAINING = {
    # The clip objective trains StableUnCLIPPipeline's prior_text_encoder and the image_encoder beside it.
    "clip": ("unclip", "shapes", ("prior_text_encoder", "image_encoder"),
             dict(steps=2400, batch_size=128, learning_rate=1e-3)),
    # The latents are shaped: channel 0 follows the foreground mask, the others stay smooth, so a shape's
    # outline is one latent direction for every colour pair (toy README, "Why blobs, found").
    "vae": ("unclip", "shapes", ("vae",), dict(steps=1600, batch_size=16, learning_rate=1e-3)),
    "prior": ("unclip", "shapes", ("prior",), dict(steps=1000, batch_size=128, learning_rate=5e-4)),
    "decoder": ("unclip", "shapes", ("unet",), dict(steps=14400, batch_size=16, learning_rate=1e-3)),
    # The decoder again, with the text dropped from half the batch: it learns to draw the picture from the
    # image embedding alone, as `unclip-jax variation` asks it to (no prompt).
    "variation": ("unclip", "shapes", ("unet",), dict(steps=1600, batch_size=16, learning_rate=1e-3)),
    "dpt": ("depth2img", "depth", ("depth_estimator",), dict(steps=600, batch_size=32, learning_rate=1e-3)),
    "depth": ("depth2img", "depth", ("unet",), dict(steps=1400, batch_size=64, learning_rate=1e-3)),
}
STAGES = ("data", "init", "clip", "stats", "vae", "prior", "decoder", "variation", "dpt", "depth", "export")
# The `unclip-jax train` objective of a stage not named after its objective.
OBJECTIVE = {"variation": "decoder"}
DATASETS = {"shapes": dict(count=16384, depth=False), "depth": dict(count=4096, depth=True),
            "heldout": dict(count=512, depth=False, held_out=True)}
# Flags of every training stage: a short warm-up, and an EMA that follows a short run (the default decay
# 0.9999 would leave the final EMA params near the initial ones after a few thousand steps).
COMMON_FLAGS = ["--resolution", "64", "--center-crop", "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", "100",
                "--ema-decay", "0.999", "--ema-warmup",
                "--save-every", "500", "--validation-prompt", "a red circle on a blue background"]
# Per stage: conditioning dropout for classifier-free guidance; the prior's target embedding comes from
# the image encoder in the same folder ({stage} is WORK/stage); the clip stage's sharp starting temperature, the
# decoder's min-SNR weighting over cached latents, the depth decoder's noise offset (it must learn to
# change a picture's mean colour). The variation stage is the decoder's with more text dropout.
DECODER_FLAGS = ["--image-dropout", "0.1", "--noise-level", "0", "300", "--snr-gamma", "5", "--cache-latents"]
FLAGS = {"clip": ["--image-encoder", "{stage}/unclip", "--logit-scale", "4.6"],
         "vae": ["--vae-mask-weight", "0.2", "--vae-smooth-weight", "1.0"],
         "prior": ["--image-encoder", "{stage}/unclip", "--text-dropout", "0.1"],
         "decoder": ["--text-dropout", "0.1", *DECODER_FLAGS],
         "variation": ["--text-dropout", "0.5", *DECODER_FLAGS],
         "dpt": ["--depth-column", "depth_file_name"],
         "depth": ["--text-dropout", "0.1", "--depth-column", "depth_file_name", "--noise-offset", "0.1"]}


def train_objectives() -> set[str]:
    """The objectives `unclip-jax train` offers."""
    from unclip_jax.training.objectives import OBJECTIVES

    return set(OBJECTIVES)


def adopt(final: str, stage_folder: str, names: tuple[str, ...]) -> None:
    """Copies the trained components `names` from a training output folder into a working folder."""
    for name in names:
        src, dst = os.path.join(final, name), os.path.join(stage_folder, name)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src}: the training output has no {name!r}")
        tmp = dst + ".new"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst)
        os.rename(tmp, dst)


def stage_data(work: str, seed: int) -> None:
    from unclip_jax.toy.domain import write_dataset

    for name, spec in DATASETS.items():
        write_dataset(os.path.join(work, "data", name), seed=seed + 1000 * (name == "heldout"), exist_ok=True,
                      **spec)


def training_arguments(name: str, work: str, seed: int) -> list[str]:
    """The `unclip-jax` arguments of training stage `name` (without --resume)."""
    folder, data, _, args = TRAINING[name]
    return ["train", OBJECTIVE.get(name, name), "--model", os.path.join(work, "stage", folder),
            "--data", os.path.join(work, "data", data),
            "--out", os.path.join(work, "runs", name), "--steps", str(args["steps"]),
            "--batch-size", str(args["batch_size"]), "--learning-rate", str(args["learning_rate"]),
            "--seed", str(seed), *COMMON_FLAGS,
            *(flag.format(stage=os.path.join(work, "stage")) for flag in FLAGS.get(name, []))]


def stage_training(name: str, work: str, seed: int, dry_run: bool) -> None:
    folder, _, trains, _ = TRAINING[name]
    out = os.path.join(work, "runs", name)
    cmd = [sys.executable, "-m", "unclip_jax.cli", *training_arguments(name, work, seed)]
    if os.path.isdir(out):
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    if dry_run:
        return
    subprocess.run(cmd, check=True)
    adopt(os.path.join(out, "final"), os.path.join(work, "stage", folder), trains)
    if name == "clip":
        from unclip_jax.toy.init import tie_text_encoders

        tie_text_encoders(os.path.join(work, "stage", "unclip"), os.path.join(work, "stage", "depth2img"), trained=True)
    if name == "vae":  # one VAE for both folders
        shutil.rmtree(os.path.join(work, "stage", "depth2img", "vae"))
        shutil.copytree(os.path.join(work, "stage", "unclip", "vae"), os.path.join(work, "stage", "depth2img", "vae"))
        set_vae_scaling_factor(work)


def set_vae_scaling_factor(work: str, count: int = 1024) -> None:
    """Sets both VAE configs' scaling_factor to 1 / std of the latents of `count` pictures, as SD's
    0.18215 was chosen for its VAE."""
    import jax
    import numpy as np

    from unclip_jax.pipelines.stable_unclip import StableUnCLIPImg2ImgPipeline
    from unclip_jax.toy.domain import draw

    pipe, params = StableUnCLIPImg2ImgPipeline.from_pretrained(os.path.join(work, "stage", "unclip"))
    encode = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method=pipe.vae.encode).mean)
    latents = []
    for start in range(0, count, 128):
        images = np.stack([draw(0, i)[0] for i in range(start, min(start + 128, count))])
        latents.append(np.asarray(encode(params["vae"], images.astype(np.float32) / 127.5 - 1.0)))
    factor = float(1.0 / np.std(np.concatenate(latents)))
    for folder in ("unclip", "depth2img"):
        path = os.path.join(work, "stage", folder, "vae", "config.json")
        with open(path) as f:
            config = json.load(f)
        config["scaling_factor"] = factor
        with open(path + ".tmp", "w") as f:
            json.dump(config, f, indent=2)
        os.replace(path + ".tmp", path)


def stage_stats(work: str, count: int = 4096) -> None:
    import numpy as np

    from unclip_jax.toy.domain import draw
    from unclip_jax.toy.init import set_embedding_stats

    images = np.stack([draw(0, i)[0] for i in range(count)])
    set_embedding_stats(os.path.join(work, "stage", "unclip"), images)


def stage_export(work: str, ship_to: str | None = None) -> None:
    """WORK/export: exactly what the package ships in unclip_jax/toy/weights (`unclip_jax.toy.default.ship`):
    fp16 pipeline folders `unclip` (StableUnCLIPPipeline's components plus the image encoder and its
    processor, so it serves both unCLIP pipelines) and `depth2img`, without tokenizer folders, and
    manifest.json. With `ship_to`, also copied there (the checkout's unclip_jax/toy/weights)."""
    import jax
    import jax.numpy as jnp

    import unclip_jax as uj
    from unclip_jax.toy.default import MANIFEST, NAMES, manifest, ship

    out, full = os.path.join(work, "export"), os.path.join(work, "export.full")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(full, ignore_errors=True)
    fp16 = lambda params: jax.tree.map(lambda x: x.astype(jnp.float16), params)  # noqa: E731
    for folder, cls in (("unclip", uj.StableUnCLIPPipeline), ("depth2img", uj.StableDiffusionDepth2ImgPipeline)):
        pipe, params = cls.from_pretrained(os.path.join(work, "stage", folder))
        pipe.save_pretrained(os.path.join(full, folder), fp16(params))
    # StableUnCLIPPipeline saves its own components only: the variation pipeline's image encoder and
    # processor join them, so the one folder serves both unCLIP pipelines.
    pipe, params = uj.StableUnCLIPImg2ImgPipeline.from_pretrained(os.path.join(work, "stage", "unclip"))
    variation = os.path.join(work, "export.variation")
    shutil.rmtree(variation, ignore_errors=True)
    pipe.save_pretrained(variation, fp16(params))
    index_path = os.path.join(full, "unclip", "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    with open(os.path.join(variation, "model_index.json")) as f:
        extra = json.load(f)
    for name in ("image_encoder", "feature_extractor"):
        shutil.copytree(os.path.join(variation, name), os.path.join(full, "unclip", name))
        index[name] = extra[name]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
    shutil.rmtree(variation)
    sizes = ship(full, out)
    shutil.rmtree(full)
    if ship_to is not None and os.path.isfile(os.path.join(ship_to, MANIFEST)):
        kept = keep_unchanged_components(out, ship_to)
        if kept:
            print(f"export: {len(kept)} component(s) unchanged, their shipped files kept: {', '.join(kept)}",
                  flush=True)
            folders = manifest(out)["folders"]
            sizes = {name: sum(size for size, _ in folders[name]["files"].values()) for name in NAMES}
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print("export: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
          + f"; {out} in all {total / 1e6:.2f} MB (the package's limit: 25 MB)", flush=True)
    with open(os.path.join(work, "export_sizes.json"), "w") as f:
        json.dump({**sizes, "total": total}, f, indent=2)
    if ship_to is not None:
        os.makedirs(ship_to, exist_ok=True)
        for name in (MANIFEST, *NAMES):  # only what `ship` writes (README.md stays); the manifest first
            path = os.path.join(ship_to, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        for name in NAMES:
            shutil.copytree(os.path.join(out, name), os.path.join(ship_to, name))
        shutil.copy2(os.path.join(out, MANIFEST), os.path.join(ship_to, MANIFEST))  # last: the folders are whole
        print(f"export: copied into {ship_to}", flush=True)


def _same_component(a: str, b: str) -> bool:
    """Whether component folders `a` and `b` hold the same params (values, dtypes, tree) and the same other
    files (configs), whatever names orbax gave the params' files."""
    import jax
    import numpy as np

    from unclip_jax.weights.orbax_io import ORBAX_DIR, restore_params

    def others(folder):
        return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                if ORBAX_DIR not in os.path.relpath(d, folder).split(os.sep)}

    if not os.path.isdir(os.path.join(b, ORBAX_DIR)) or others(a) != others(b):
        return False
    for rel in others(a):
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            if fa.read() != fb.read():
                return False
    pa, pb = restore_params(os.path.join(a, ORBAX_DIR)), restore_params(os.path.join(b, ORBAX_DIR))
    la, ta = jax.tree.flatten(pa)
    lb, tb = jax.tree.flatten(pb)
    return ta == tb and all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb))


def keep_unchanged_components(out: str, shipped: str) -> list[str]:
    """In export folder `out`, replaces each component whose params and configs equal those already in
    `shipped` (the checkout's unclip_jax/toy/weights) with the shipped files, and rewrites out's manifest.
    orbax names its files at random, so a re-export of unchanged weights would otherwise change every
    file; this way a re-ship commits only what was retrained. Returns the kept components (folder/name)."""
    from unclip_jax.toy.default import NAMES, folder_entry, manifest, write_manifest
    from unclip_jax.weights.orbax_io import ORBAX_DIR

    entries, kept = manifest(out)["folders"], []
    for name in NAMES:
        for component in sorted(os.listdir(os.path.join(out, name))):
            new, old = os.path.join(out, name, component), os.path.join(shipped, name, component)
            if os.path.isdir(os.path.join(new, ORBAX_DIR)) and _same_component(new, old):
                shutil.rmtree(new)
                shutil.copytree(old, new)
                kept.append(f"{name}/{component}")
        entries[name] = folder_entry(os.path.join(out, name), entries[name]["tokenizers"])
    write_manifest(out, entries)
    return kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="working folder (datasets, runs, stage, export)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands; run no stage")
    parser.add_argument("--ship", action="store_true",
                        help="export: also copy WORK/export into this checkout's unclip_jax/toy/weights (replacing "
                             "the shipped default model there)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every step count and dataset size by this (a smoke run: 0.002)")
    args = parser.parse_args(argv)
    stages = args.only or STAGES
    if args.scale != 1.0:
        for spec in TRAINING.values():
            spec[3]["steps"] = max(2, round(spec[3]["steps"] * args.scale))
        for spec in DATASETS.values():
            spec["count"] = max(64, round(spec["count"] * args.scale))
    needed = {OBJECTIVE.get(s, s) for s in stages if s in TRAINING}
    if needed and not args.dry_run:
        missing = sorted(needed - train_objectives())
        if missing:
            print(f"not runnable: `unclip-jax train` lacks the objective(s) {', '.join(missing)}", file=sys.stderr)
            return 2
    work = os.path.abspath(args.work)
    timings_path = os.path.join(work, "timings.json")
    os.makedirs(work, exist_ok=True)
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    for stage in stages:
        if args.dry_run and stage not in TRAINING:
            continue
        start = time.time()
        if stage == "data":
            stage_data(work, args.seed)
        elif stage == "init":
            if not os.path.isdir(os.path.join(work, "stage")):
                from unclip_jax.toy.init import write_initial

                write_initial(os.path.join(work, "stage"), seed=args.seed)
        elif stage == "stats":
            if not args.dry_run:
                stage_stats(work)
        elif stage == "export":
            if not args.dry_run:
                stage_export(work, os.path.join(os.path.dirname(HERE), "unclip_jax", "toy", "weights")
                             if args.ship else None)
        else:
            stage_training(stage, work, args.seed, args.dry_run)
        if args.dry_run:
            continue
        timings[stage] = round(time.time() - start, 1)
        print(f"{stage}: {timings[stage]} s", flush=True)
        with open(timings_path + ".tmp", "w") as f:
            json.dump(timings, f, indent=2)
        os.replace(timings_path + ".tmp", timings_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
