"""`unclip-jax variation`: image -> CLIP image embedding (noised by --noise-level) -> Stable unCLIP decoder,
optionally guided by a prompt -> PNGs.

Without --model: the default model shipped in the package (unclip_jax.toy.default, its `unclip` folder,
which holds the image encoder too), 64 x 64 pictures of one coloured shape on a plain background."""

from __future__ import annotations

from unclip_jax.cli import common
from unclip_jax.cli.parsing import PROG, add_noise_level, add_size, check_generation_arguments, generation_parser

EXAMPLES = f"""examples:
  {PROG} variation --image shape.png                           # the default (toy-domain) model
  {PROG} variation --image fox.png --model stabilityai/stable-diffusion-2-1-unclip --noise-level 100
  {PROG} variation "in the snow" --image fox.png --model ./unclip-img2img-orbax --count 4 --seed 3"""


def add_parser(sub) -> None:
    v = generation_parser(sub, "variation", "variations of an image (StableUnCLIPImg2ImgPipeline)",
                          "Image -> CLIP image embedding (noised by --noise-level) -> Stable unCLIP decoder, "
                          "optionally guided by a prompt -> PNGs. Without --model: the built-in toy-domain model "
                          "(64 x 64 pictures of one coloured shape).", EXAMPLES, steps=20, guidance=10.0)
    v.add_argument("prompt", nargs="?", default="", help="optional text guidance (default: none)")
    v.add_argument("--image", required=True, metavar="PATH", help="the image to vary (any format PIL reads)")
    add_noise_level(v)
    add_size(v, "output size in pixels, a multiple of 8 (default: the model's: 64 for the default model, 768 "
                "for the real checkpoints)")


def check(args) -> None:
    check_generation_arguments(args)
    args.images = {"image": common.read_image(args.image, "--image")}
    common.check_out(args.out)
    common.check_model_folder(args)


def run(args, progress: bool) -> None:
    common.generate(args, progress, lambda pipe, keywords: pipe(
        args.images["image"], args.prompt, height=args.height, width=args.width, noise_level=args.noise_level,
        **keywords).images)
