"""`unclip-jax generate`: many images from a prompts file or a dataset column, resumable and sharded.

    unclip-jax generate PROMPTS [--model DIR] --out DIR --seed S --batch-size B [--steps N]
        [--format png|webdataset] [--pipeline txt2img|variation|depth2img] [--strict] [--clip-model DIR]

Without --model: the default model shipped in the package (unclip_jax.toy.default; its `unclip` folder
for txt2img and variation, its `depth2img` folder for depth2img).

Nothing here imports JAX until the command runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from unclip_jax.cli.parsing import DEFAULT_MODEL_HELP, DTYPES, add_size
from unclip_jax.files import file_sha256

DESCRIPTION = """\
Makes one image per item of PROMPTS and writes them to --out with an index (OUT/index.jsonl: index,
file, seed, arguments, CLIP score per finished item). PROMPTS is a text file: one item per line, a plain
prompt (for variation: an image path), or a JSON object with `prompt` and any of `negative_prompt`, `seed`,
`image` (a path, relative to the file's folder), `guidance_scale`, `num_inference_steps`, `noise_level`,
`strength`, `height`, `width`, `prior_guidance_scale`, `prior_num_inference_steps`, `eta`. With
--dataset-column, PROMPTS is a Hugging Face dataset (hub name or a save_to_disk folder).

An item's image depends only on the model, its arguments and its seed (default: --seed + its index),
not on --batch-size, the devices or hosts, or where the run was resumed. Killed at any moment, the same
command resumes and ends with exactly the files an uninterrupted run makes. Batches are split over every
local device; for several hosts call jax.distributed.initialize() first (see unclip_jax/generation/run.py).
Bad lines and unreadable images are reported and skipped (the summary counts them); --strict stops
before any work instead."""

EXAMPLES = """examples:
  unclip-jax tiny tiny-unclip
  printf 'a red fox\\n{"prompt": "a lighthouse", "seed": 7, "guidance_scale": 3}\\n' > prompts.txt
  unclip-jax generate prompts.txt --model tiny-unclip --out out --seed 0 --batch-size 8 --steps 4 --prior-steps 4
  unclip-jax generate images.txt --pipeline variation --model ./unclip-img2img --out vars --format webdataset"""

DEFAULTS = {  # pipeline -> (steps, guidance)
    "txt2img": (20, 10.0), "variation": (20, 10.0), "depth2img": (50, 7.5),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `generate` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("generate", help="many images from a prompts file or dataset: resumable, sharded, "
                                               "deterministic per item, with CLIP scores",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", metavar="PROMPTS", help="prompts file (plain or JSON lines), or a dataset with "
                                                      "--dataset-column")
    p.add_argument("--model", default=None, metavar="PATH_OR_REPO_ID",
                   help=f"pipeline folder or hub repo id ({DEFAULT_MODEL_HELP}: its unclip pipeline for txt2img "
                        "and variation, its depth2img pipeline for depth2img)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it holds this run)")
    p.add_argument("--pipeline", default="txt2img", choices=tuple(DEFAULTS), help="default txt2img")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="run seed: item i's seed is S + i unless it "
                                                                    "gives its own (default 0)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="items per pipeline call (default 8)")
    p.add_argument("--format", default="png", choices=("png", "webdataset"),
                   help="png: OUT/00000.png ...; webdataset: OUT/shard-00000.tar ... with KEY.png + KEY.json")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N",
                   help="webdataset items per shard, rounded up to whole batches (default 1000)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line or image, before any work")
    p.add_argument("--clip-model", default=None, metavar="DIR",
                   help="a CLIP checkpoint folder (transformers CLIPModel) to score images against their prompts; "
                        "without it, variation scores against the source image with its own image encoder and "
                        "the other pipelines are not scored")
    d = p.add_argument_group("dataset input")
    d.add_argument("--dataset-column", default=None, metavar="COL", help="PROMPTS is a dataset; prompts from COL")
    d.add_argument("--image-column", default=None, metavar="COL", help="images from COL (variation, depth2img)")
    d.add_argument("--split", default="train", help="dataset split (default train)")
    m = p.add_argument_group("model")
    m.add_argument("--prior", default=None, metavar="PATH_OR_REPO_ID", help="txt2img: take the prior from here "
                                                                             "(as `unclip-jax txt2img --prior`)")
    m.add_argument("--dtype", default="fp32", choices=DTYPES, help="compute dtype (default fp32)")
    m.add_argument("--variant", default=None, help='weight file variant, e.g. "fp16"')
    m.add_argument("--revision", default=None, help="hub revision")
    m.add_argument("--local-files-only", action="store_true", help="use the hub cache only")
    s = p.add_argument_group("defaults for every item (a JSON line may override them)")
    s.add_argument("--steps", type=int, default=None, metavar="N", help="denoising steps (default 20; depth2img 50)")
    s.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                   help="guidance scale, <= 1 off (default 10; depth2img 7.5; the default model: its own, "
                        "unclip_jax.toy.default.SAMPLING)")
    s.add_argument("--negative-prompt", default=None, metavar="TEXT")
    s.add_argument("--scheduler", default=None, metavar="NAME", help="decoder scheduler (as `unclip-jax txt2img`)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    s.add_argument("--noise-level", type=int, default=0, metavar="LEVEL", help="txt2img/variation (default 0)")
    s.add_argument("--strength", type=float, default=0.8, metavar="S", help="depth2img (default 0.8)")
    s.add_argument("--prior-steps", type=int, default=25, metavar="N", help="txt2img prior steps (default 25)")
    s.add_argument("--prior-guidance", type=float, default=None, metavar="SCALE",
                   help="txt2img (default 4; the default model: its own)")
    add_size(s, "image size in pixels, a multiple of 8 (default: the model's; depth2img: each input image's, cut "
                "down to a multiple of 8)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="do not use the persistent compilation cache (as the other generating commands)")
    return p


def defaults_of(args) -> dict:
    """The run's per-item defaults, in the pipelines' argument names."""
    steps, guidance = DEFAULTS[args.pipeline]
    prior_guidance = 4.0
    if args.model is None:  # the shipped default model samples with its own guidance, as txt2img & co do
        from unclip_jax.toy.default import SAMPLING  # noqa: PLC0415

        own = SAMPLING[args.pipeline]
        guidance, prior_guidance = own["guidance"], own.get("prior_guidance", prior_guidance)
    return {
        "num_inference_steps": args.steps or steps,
        "guidance_scale": guidance if args.guidance is None else args.guidance,
        "negative_prompt": args.negative_prompt, "eta": args.eta, "noise_level": args.noise_level,
        "strength": args.strength, "prior_num_inference_steps": args.prior_steps,
        "prior_guidance_scale": prior_guidance if args.prior_guidance is None else args.prior_guidance, "height": args.height, "width": args.width,
    }


def check(args) -> None:
    """Checks that load no model (a UsageError or ValueError naming the flag)."""
    from unclip_jax.cli import common  # noqa: PLC0415
    from unclip_jax.cli.parsing import UsageError, check_generation_arguments  # noqa: PLC0415

    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0; got {args.seed}")
    check_generation_arguments(args)
    if args.dataset_column is None and not os.path.isfile(args.prompts):
        raise UsageError(f"PROMPTS {args.prompts}: no such file")
    if args.clip_model is not None and not os.path.isdir(args.clip_model):
        raise UsageError(f"--clip-model {args.clip_model}: no such folder")
    common.check_out(args.out)
    common.check_model_folder(_as_pipeline_command(args))


def _as_pipeline_command(args) -> argparse.Namespace:
    """The arguments as `unclip-jax PIPELINE` would hold them, for the shared checks and loading."""
    return argparse.Namespace(**dict(vars(args), command=args.pipeline))


def read_items(args):
    from unclip_jax.generation.items import read_dataset, read_prompts  # noqa: PLC0415

    common = dict(pipeline=args.pipeline, defaults=defaults_of(args), seed=args.seed)
    if args.dataset_column is not None:
        return read_dataset(args.prompts, column=args.dataset_column, image_column=args.image_column,
                            split=args.split, **common)
    return read_prompts(args.prompts, **common)


def run(args, progress: bool) -> None:
    """The command (after `check`): reads the items, loads, generates; one summary line on stderr."""
    from unclip_jax.cli import common  # noqa: PLC0415
    from unclip_jax.generation.items import InputError  # noqa: PLC0415

    items, errors = read_items(args)
    if args.strict and errors:
        raise InputError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    t0 = time.time()
    pipe, params = common.load(_as_pipeline_command(args), progress)
    from unclip_jax.generation.clip_score import CLIPScorer  # noqa: PLC0415
    from unclip_jax.generation.run import BatchRunner, generate, run_info_of  # noqa: PLC0415

    scorer = CLIPScorer.from_pretrained(args.clip_model) if args.clip_model else CLIPScorer.from_pipeline(pipe, params)
    fingerprint = {"input": args.prompts if args.dataset_column else None, "seed": args.seed,
                   "defaults": defaults_of(args), "dtype": args.dtype, "prior": args.prior,
                   "clip_model": args.clip_model,
                   "input_sha256": None if args.dataset_column else file_sha256(args.prompts),
                   "dataset": [args.dataset_column, args.image_column, args.split] if args.dataset_column else None}
    summary = generate(BatchRunner(pipe, params, args.pipeline), items, out=args.out, batch_size=args.batch_size,
                       fmt=args.format, shard_size=args.shard_size, scorer=scorer, strict=args.strict,
                       progress=progress,
                       run_info=run_info_of(pipe, args.pipeline, common.model_name(_as_pipeline_command(args))),
                       fingerprint=fingerprint, errors=errors)
    summary.seconds = time.time() - t0
    print(f"unclip-jax generate: {summary.line()}", file=sys.stderr, flush=True)
