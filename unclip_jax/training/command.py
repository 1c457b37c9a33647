"""`unclip-jax train OBJECTIVE ...`: parsing and running (option names follow diffusers' training scripts,
with dashes). `register(subparsers)` adds the subcommand; `run(args)` runs it. Nothing here imports JAX
until a run starts, so `--help` is fast."""

from __future__ import annotations

import argparse
import textwrap

from unclip_jax.training.objectives import OBJECTIVES

EXAMPLES = """examples:
  unclip-jax tiny tiny-img2img --kind unclip_img2img
  unclip-jax train decoder --model tiny-img2img --data my-images --out run --steps 200 --batch-size 4 \\
      --learning-rate 1e-4 --seed 0 --save-every 50 --validation-prompt "a red fox" --validation-every 50
  unclip-jax train decoder ... --resume          (continue from run/checkpoints after an interruption)
  unclip-jax train decoder ... --distributed --coordinator-address host0:4321 --num-processes 2 --process-id 0
                                                 (on host0; the same with --process-id 1 on host1)

data: an image folder with metadata.jsonl ({"file_name": "a.png", "text": "a caption"} per line; for depth
also "depth_file_name": a .npy or grayscale image) or a Hugging Face `datasets` save_to_disk folder.
OUT: metrics.jsonl (one line per step), tensorboard/, checkpoints/, validation/step-XXXXXX.png, final/
(a pipeline folder that from_pretrained loads)."""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune or train a model (decoder, prior, depth, LoRA, textual inversion, CLIP, VAE, DPT)",
        description=textwrap.fill("Trains one objective on a pipeline folder and writes checkpoints, metrics, "
                                  "validation grids and a final pipeline folder to --out. A run killed at any "
                                  "moment continues with --resume as if it had not stopped.", 78),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("objective", choices=OBJECTIVES, help="what to train")
    p.add_argument("--model", required=True, metavar="DIR_OR_ID", help="the pipeline to start from")
    p.add_argument("--data", required=True, metavar="DIR", help="image folder or datasets save_to_disk folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="optimizer steps")
    p.add_argument("--batch-size", type=int, required=True, metavar="B",
                   help="examples per micro-batch over all devices (a step takes B x accumulation steps)")
    p.add_argument("--learning-rate", type=float, default=1e-4, metavar="LR", help="peak learning rate (1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentation and noise (0)")
    p.add_argument("--save-every", type=int, default=500, metavar="K", help="checkpoint every K steps (500)")
    p.add_argument("--keep", type=int, default=3, metavar="K", help="checkpoints kept (3)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")

    d = p.add_argument_group("data")
    d.add_argument("--resolution", type=int, default=None, metavar="R",
                   help="training image side, a multiple of the VAE factor (default: the model's)")
    d.add_argument("--center-crop", action="store_true", help="centre crops (default: random crops)")
    d.add_argument("--random-flip", action="store_true", help="flip images left-right at random")
    d.add_argument("--image-interpolation-mode", default="lanczos",
                   choices=("lanczos", "bilinear", "bicubic", "nearest"), help="resize filter (lanczos)")
    d.add_argument("--image-column", default="image", help="a dataset's image column (image)")
    d.add_argument("--caption-column", default="text", help="the caption column (text)")
    d.add_argument("--depth-column", default=None,
                   help="the depth-map column (depth training; default depth_file_name)")
    d.add_argument("--skip-missing-files", action="store_true",
                   help="skip (and count) metadata lines naming missing files instead of stopping")
    d.add_argument("--cache-latents", action="store_true",
                   help="decoder, depth: VAE-encode every picture (and CLIP-embed it, decoder) once before the "
                        "first step, in memory, instead of on every step; needs --center-crop, no --random-flip")

    o = p.add_argument_group("optimization")
    o.add_argument("--gradient-accumulation-steps", type=int, default=1, metavar="N")
    o.add_argument("--lr-scheduler", default="constant",
                   choices=("constant", "constant_with_warmup", "linear", "cosine"))
    o.add_argument("--lr-warmup-steps", type=int, default=500, metavar="N",
                   help="warm-up steps (500; constant has none)")
    o.add_argument("--adam-beta1", type=float, default=0.9)
    o.add_argument("--adam-beta2", type=float, default=0.999)
    o.add_argument("--adam-weight-decay", type=float, default=1e-2)
    o.add_argument("--adam-epsilon", type=float, default=1e-8)
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (1.0; 0: off)")
    o.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (0.9999; 0: no EMA)")
    o.add_argument("--ema-warmup", action="store_true", help="EMAModel's use_ema_warmup decay ramp")
    o.add_argument("--ema-power", type=float, default=2 / 3)
    o.add_argument("--ema-inv-gamma", type=float, default=1.0)
    o.add_argument("--mixed-precision", default="no", choices=("no", "bf16"),
                   help="bf16: bf16 compute, fp32 master params and optimizer state (no)")
    o.add_argument("--remat", "--gradient-checkpointing", dest="remat", action="store_true",
                   help="rematerialise UNet and prior blocks in the backward pass (less memory)")
    o.add_argument("--fsdp", type=int, default=1, metavar="N", help="shard params over groups of N devices (1)")
    o.add_argument("--distributed", action="store_true",
                   help="several processes (hosts): call jax.distributed.initialize() first; start one process "
                        "per host with the same arguments (on SLURM, Open MPI, Kubernetes or a Cloud TPU pod they "
                        "find each other; elsewhere add the three options below)")
    o.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="with --distributed: process 0's address, the same for every process (default: "
                        "$JAX_COORDINATOR_ADDRESS or the cluster manager's)")
    o.add_argument("--num-processes", type=int, default=None, metavar="N", help="with --distributed: how many")
    o.add_argument("--process-id", type=int, default=None, metavar="I", help="with --distributed: this one's, 0..N-1")

    j = p.add_argument_group("objective")
    j.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-gamma loss weighting (off)")
    j.add_argument("--noise-offset", type=float, default=0.0)
    j.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction", "sample"))
    j.add_argument("--text-dropout", type=float, default=0.0, help="caption dropout probability (for CFG)")
    j.add_argument("--image-dropout", type=float, default=0.0, help="image-embedding dropout probability")
    j.add_argument("--noise-level", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="the decoder's noise-augmentation levels (default: all)")
    j.add_argument("--image-encoder", default=None, help="the prior's image encoder, if the model has none")
    j.add_argument("--lora-rank", type=int, default=None)
    j.add_argument("--lora-alpha", type=float, default=None)
    j.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    j.add_argument("--vae-decoder-only", action="store_true",
                   help="vae: train the decoder and post_quant_conv only; the encoder, and so the latents a UNet "
                        "was trained on, stay (a decoder fine-tune)")
    j.add_argument("--vae-mask-weight", type=float, default=None, metavar="W",
                   help="vae: pull latent channel 0 towards the foreground mask (+1 object, -1 background) with "
                        "weight W (off)")
    j.add_argument("--vae-smooth-weight", type=float, default=None, metavar="W",
                   help="vae: penalise the other latent channels' high frequencies with weight W (off)")
    j.add_argument("--logit-scale", type=float, default=None,
                   help="clip: the initial logit scale, ln(1 / temperature) (ln(1 / 0.07) ~ 2.66, CLIP's)")
    j.add_argument("--placeholder-token", default=None)
    j.add_argument("--initializer-token", default=None)
    j.add_argument("--num-vectors", type=int, default=None)

    v = p.add_argument_group("watching")
    v.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt to sample with the EMA params (repeatable)")
    v.add_argument("--validation-every", type=int, default=0, metavar="N",
                   help="steps between validation grids (0: at the start and the end only)")
    v.add_argument("--validation-steps", type=int, default=20, metavar="N", help="sampling steps (20)")
    v.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    return p


def _options(args) -> dict:
    names = {"snr_gamma": "snr_gamma", "noise_offset": "noise_offset", "prediction_type": "prediction_type",
             "text_dropout": "text_dropout", "image_dropout": "image_dropout", "noise_level": "noise_level",
             "image_encoder": "image_encoder", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
             "placeholder_token": "placeholder_token", "initializer_token": "initializer_token",
             "num_vectors": "num_vectors", "logit_scale": "logit_scale", "mask_weight": "vae_mask_weight",
             "smooth_weight": "vae_smooth_weight"}
    out = {key: getattr(args, attr) for key, attr in names.items() if getattr(args, attr) is not None}
    if args.noise_level is not None:
        out["noise_level"] = tuple(args.noise_level)
    if args.train_text_encoder:
        out["lora_text_encoder"] = True
    if args.vae_decoder_only:
        out["vae_decoder_only"] = True
    return out


def config_from_args(args):
    from unclip_jax.training.loop import RunConfig  # noqa: PLC0415
    from unclip_jax.training.step import StepConfig  # noqa: PLC0415

    step = StepConfig(steps=args.steps, learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler,
                      lr_warmup_steps=args.lr_warmup_steps, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                      adam_weight_decay=args.adam_weight_decay, adam_epsilon=args.adam_epsilon,
                      max_grad_norm=args.max_grad_norm or None,
                      gradient_accumulation_steps=args.gradient_accumulation_steps,
                      ema_decay=args.ema_decay or None, ema_warmup=args.ema_warmup, ema_power=args.ema_power,
                      ema_inv_gamma=args.ema_inv_gamma, mixed_precision=args.mixed_precision)
    return RunConfig(objective=args.objective, model=args.model, data=args.data, out=args.out,
                     batch_size=args.batch_size, step=step, seed=args.seed, save_every=args.save_every,
                     keep=args.keep, resume=args.resume, resolution=args.resolution, center_crop=args.center_crop,
                     random_flip=args.random_flip, interpolation=args.image_interpolation_mode,
                     image_column=args.image_column, caption_column=args.caption_column,
                     depth_column=args.depth_column, skip_missing_files=args.skip_missing_files,
                     validation_prompts=tuple(args.validation_prompt), validation_every=args.validation_every,
                     validation_steps=args.validation_steps, remat=args.remat, fsdp=args.fsdp,
                     objective_options=_options(args), progress=args.progress, cache_latents=args.cache_latents)


def initialize_distributed(args) -> None:
    """`jax.distributed.initialize` with the command's options, if `--distributed` (before any JAX
    computation); a clear error when the options are incomplete and no cluster manager supplies the rest."""
    given = {"--coordinator-address": args.coordinator_address, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if not args.distributed:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise ValueError(f"{', '.join(named)}: only with --distributed")
        return
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes {args.num_processes}: must be at least 1")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
        raise ValueError(f"--process-id {args.process_id}: must be in 0..{args.num_processes - 1}")
    import jax  # noqa: PLC0415

    try:
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    except ValueError as e:
        missing = ", ".join(k for k, v in given.items() if v is None)
        raise ValueError(f"--distributed: {e} (no cluster manager found; pass {missing})") from None


def run(args) -> int:
    """Runs the parsed `train` command; prints OUT/final on stdout."""
    from unclip_jax.training.loop import train  # noqa: PLC0415

    config = config_from_args(args)  # bad option values fail here, before any process waits for its peers
    initialize_distributed(args)
    print(train(config))
    return 0
