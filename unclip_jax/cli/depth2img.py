"""`unclip-jax depth2img`: image -> depth (the checkpoint's DPT, or --depth-map) + VAE latents noised to
--strength -> denoised under the prompt -> PNGs (and, with --save-depth, the depth map used).

Without --model: the default model shipped in the package (unclip_jax.toy.default, its `depth2img`
folder), trained on 64 x 64 scenes; the input image is then resized to 64 x 64 unless --size says
otherwise."""

from __future__ import annotations

import time

from unclip_jax.cli import common
from unclip_jax.cli.parsing import PROG, UsageError, add_size, check_generation_arguments, generation_parser

EXAMPLES = f"""examples:
  {PROG} depth2img "a green square on a white background" --image scene.png   # the default model
  {PROG} depth2img "a marble statue" --image room.png --model stabilityai/stable-diffusion-2-depth
  {PROG} depth2img "an oil painting" --image room.png --depth-map room_depth.png --strength 0.7 --size 512 \\
      --model ./depth-orbax --save-depth"""


def add_parser(sub) -> None:
    d = generation_parser(sub, "depth2img", "re-render an image from a prompt, keeping its depth "
                                            "(StableDiffusionDepth2ImgPipeline)",
                          "Image -> depth (estimated by the checkpoint's DPT, or --depth-map) + VAE latents "
                          "noised to --strength -> denoised under the prompt -> PNGs. Without --model: the built-in "
                          "toy-domain model (scenes of coloured shapes, 64 x 64).", EXAMPLES,
                          steps=50, guidance=7.5, default_model="depth2img")
    d.add_argument("prompt", help="what the image should become")
    d.add_argument("--image", required=True, metavar="PATH", help="the image to re-render (any format PIL reads)")
    d.add_argument("--strength", type=float, default=0.8, metavar="S",
                   help="how much to change, in (0, 1]: int(steps * S) of the steps are run (default 0.8)")
    d.add_argument("--depth-map", default=None, metavar="PATH",
                   help="a depth image to use instead of the estimate (grayscale, near = bright; color is "
                        "read as luminance; any scale)")
    d.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse input images of more pixels than this (default: the pipelines' budget, "
                        "unclip_jax.pipelines.checks.MAX_PIXELS, 1024 x 1024; depth estimation and the VAE run "
                        "at the input's size); 0: no limit")
    d.add_argument("--save-depth", action="store_true",
                   help="also write the depth map used, as a 16-bit PNG at the input image's size")
    add_size(d, "resize the input image to this size first, a multiple of 8 (default: as it is, cut down to a "
                "multiple of 8; with the default model, its 64)")


def check(args) -> None:
    from unclip_jax.pipelines import checks  # noqa: PLC0415  (import time: see parsing)

    check_generation_arguments(args)
    if args.model is None and args.height is None and args.width is None:
        from unclip_jax.toy import default  # noqa: PLC0415  (standard library only)

        common.check_model_folder(args)  # first: a missing default model is named before its configs are read
        args.height = args.width = default.picture_size(common.DEFAULT_MODELS[args.command])
    if args.max_pixels is None:
        args.max_pixels = checks.MAX_PIXELS
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width (or --size) to resize the input image")
    if args.max_pixels:
        checks.check_max_pixels(args.max_pixels, "--max-pixels")
    args.images = {"image": common.read_image(args.image, "--image")}
    width, height = args.images["image"].size if args.height is None else (args.width, args.height)
    checks.check_pixels(height, width, args.max_pixels or None, f"--image {args.image}", "--max-pixels 0")
    if args.depth_map is not None:
        depth = common.read_image(args.depth_map, "--depth-map")
        args.images["depth_map"] = depth if depth.mode in ("L", "I", "I;16", "F") else depth.convert("L")
    common.check_out(args.out)
    common.check_model_folder(args)


def _depth_png(depth, size):
    """A depth map [..., H', W'] -> a 16-bit PNG image of `size` (W, H), normalised to the full range."""
    import numpy as np  # noqa: PLC0415  (import time: see common)
    import PIL.Image  # noqa: PLC0415

    d = np.asarray(depth, np.float32)
    d = PIL.Image.fromarray(d.reshape(d.shape[-2:])).resize(size, resample=PIL.Image.BICUBIC)
    d = np.asarray(d, np.float64)
    d = (d - d.min()) / max(d.max() - d.min(), 1e-12)
    return PIL.Image.fromarray(np.round(d * 65535).astype(np.uint16))


def run(args, progress: bool) -> None:
    import numpy as np  # noqa: PLC0415  (import time: see common)
    import PIL.Image  # noqa: PLC0415

    pipe, params = common.load(args, progress)
    recorded = common.settings(args, pipe)
    image = args.images["image"]
    if args.height is not None:
        image = image.resize((args.width, args.height), resample=PIL.Image.LANCZOS)
    extra = {}
    t0 = time.time()
    with common.elapsed("generating (compiles on first use)", progress):
        depth = args.images.get("depth_map")
        if depth is None and args.save_depth:
            depth = np.asarray(pipe.estimate_depth(params, image))
        if args.save_depth:
            extra["depth"] = _depth_png(depth, image.size)
        images = pipe(args.prompt, image, depth_map=depth, strength=args.strength,
                      **common.call_arguments(args, params, progress)).images
    common.log(f"generated {len(images)} image(s) in {time.time() - t0:.1f}s")
    common.save(images, args, recorded, extra)
