"""`unclip-jax txt2img`: text -> Karlo prior -> CLIP image embedding -> Stable unCLIP decoder -> PNGs.

Without --model: the default model shipped in the package (unclip_jax.toy.default, its `unclip` folder),
a toy-domain model of one coloured shape on a plain background that makes 64 x 64 pictures."""

from __future__ import annotations

from unclip_jax.cli import common
from unclip_jax.cli.parsing import PROG, add_noise_level, add_size, check_generation_arguments, generation_parser

EXAMPLES = f"""examples:
  {PROG} txt2img "a red circle on a blue background"          # the default (toy-domain) model
  {PROG} txt2img "a photo of a red fox" --model stabilityai/stable-diffusion-2-1-unclip-small \\
      --prior kakaobrain/karlo-v1-alpha
  {PROG} txt2img "a watercolor lighthouse" --model ./unclip-orbax --steps 30 --scheduler dpm++ --count 4 --out out
  {PROG} tiny tiny-unclip && {PROG} txt2img "a cat" --model tiny-unclip --steps 4 --prior-steps 4"""


def add_parser(sub) -> None:
    g = generation_parser(sub, "txt2img", "generate images from a prompt (StableUnCLIPPipeline)",
                          "Text -> Karlo prior -> CLIP image embedding -> Stable unCLIP decoder -> PNGs. "
                          "Without --model: the built-in toy-domain model (one shape of one colour on a plain "
                          "background, 64 x 64).", EXAMPLES, steps=20, guidance=10.0)
    g.add_argument("prompt", help="what to draw")
    g.add_argument("--prior", default=None, metavar="PATH_OR_REPO_ID",
                   help="take the prior (tokenizer, CLIP text model, PriorTransformer, scheduler) from this "
                        "pipeline: a Karlo UnCLIPPipeline (kakaobrain/karlo-v1-alpha, as diffusers' recipe "
                        "for stable-diffusion-2-1-unclip-small) or a StableUnCLIPPipeline; then --model may "
                        "be an image-variation checkpoint, whose decoder is used (needs --model)")
    g.add_argument("--prior-steps", type=int, default=25, metavar="N", help="prior denoising steps (default 25)")
    g.add_argument("--prior-guidance", type=float, default=None, metavar="SCALE",
                   help="prior guidance scale (default 4; the default model: 2)")
    g.set_defaults(model_guidance={"guidance": 10.0, "prior_guidance": 4.0})
    add_noise_level(g)
    add_size(g, "image size in pixels, a multiple of 8 (default: the model's: 64 for the default model, 768 for "
                "the real checkpoints)")


def check(args) -> None:
    check_generation_arguments(args)
    common.check_out(args.out)
    common.check_model_folder(args)


def run(args, progress: bool) -> None:
    common.generate(args, progress, lambda pipe, keywords: pipe(
        args.prompt, height=args.height, width=args.width, noise_level=args.noise_level,
        prior_num_inference_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance, **keywords).images)
