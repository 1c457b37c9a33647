"""The `unclip-jax` command.

    unclip-jax tiny DIR                       write a tiny random-weight Stable unCLIP checkpoint (no network)
    unclip-jax txt2img PROMPT --model M       text -> image(s) as PNG, generation parameters in the metadata

User mistakes (a missing model, a bad size) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unclip-jax", description="Stable unCLIP and depth-to-image in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny", help="write a tiny random-weight Stable unCLIP checkpoint (for trying things out)")
    t.add_argument("out", help="folder to create")
    t.add_argument("--seed", type=int, default=0)

    g = sub.add_parser("txt2img", help="generate images from a prompt with StableUnCLIPPipeline")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="pipeline folder (diffusers or saved) or hub repo id")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=20, help="decoder denoising steps (default 20)")
    g.add_argument("--prior-steps", type=int, default=25, help="prior denoising steps (default 25)")
    g.add_argument("--guidance", type=float, default=10.0, help="decoder guidance scale (default 10)")
    g.add_argument("--prior-guidance", type=float, default=4.0, help="prior guidance scale (default 4)")
    g.add_argument("--noise-level", type=int, default=0, help="image-embedding noise level (default 0)")
    g.add_argument("--size", type=int, default=None, help="height and width in pixels (default: the model's)")
    g.add_argument("--count", type=int, default=1, help="images to make (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=".", help="output folder (default: here)")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _txt2img(args) -> None:
    import jax  # noqa: PLC0415
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415

    from unclip_jax.pipelines.stable_unclip import StableUnCLIPPipeline  # noqa: PLC0415

    if args.size is not None and (args.size <= 0 or args.size % 8):
        raise ValueError(f"--size must be a positive multiple of 8; got {args.size}")
    if args.count < 1 or args.steps < 1 or args.prior_steps < 1:
        raise ValueError("--count, --steps and --prior-steps must be at least 1")
    t0 = time.time()
    _log(f"loading {args.model} ...")
    pipe, params = StableUnCLIPPipeline.from_pretrained(args.model)
    _log(f"loaded in {time.time() - t0:.1f}s; compiling and sampling ...")
    t0 = time.time()
    images = pipe(args.prompt, params=params, key=jax.random.key(args.seed), height=args.size, width=args.size,
                  num_inference_steps=args.steps, prior_num_inference_steps=args.prior_steps,
                  guidance_scale=args.guidance, prior_guidance_scale=args.prior_guidance,
                  negative_prompt=args.negative_prompt, noise_level=args.noise_level,
                  num_images_per_prompt=args.count).images
    _log(f"sampled in {time.time() - t0:.1f}s")
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "out")}
    for i, image in enumerate(images):
        info = PngInfo()
        info.add_text("parameters", json.dumps(dict(settings, index=i)))
        path = os.path.join(args.out, f"unclip_{args.seed}_{i}.png")
        image.save(path, pnginfo=info)
        print(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from unclip_jax.weights.safetensors_io import CheckpointError  # noqa: PLC0415

    try:
        if args.command == "tiny":
            from unclip_jax.tiny import write_tiny_unclip  # noqa: PLC0415

            print(write_tiny_unclip(args.out, seed=args.seed))
        else:
            _txt2img(args)
    except (CheckpointError, ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        print(f"unclip-jax {args.command}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
