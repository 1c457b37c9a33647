"""Decoder training steps with and without `--cache-latents`, one after the other in one run.

    python benchmarks/train_cache_latents.py [--model FOLDER] [--pictures 4096] [--steps 30] [--batch 64]

Both runs are `unclip-jax train decoder` subprocesses on the same toy-domain pictures (written once to a
temporary folder by `unclip_jax.toy.domain.write_dataset`), 64 x 64, centre-cropped, with the default
model's decoder flags (scripts/train_default_model.py). Printed: the median seconds per step (the first 5
steps, compilation, left out), their ratio, and the one-off time the cached run spent encoding every
picture before its first step, so that the break-even number of steps can be read off. `--model`
defaults to the default (toy) model's unCLIP folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

FLAGS = ["--resolution", "64", "--center-crop", "--learning-rate", "1e-3", "--lr-scheduler", "constant_with_warmup",
         "--lr-warmup-steps", "10", "--ema-decay", "0.999", "--ema-warmup", "--text-dropout", "0.1",
         "--image-dropout", "0.1", "--noise-level", "0", "300", "--no-progress"]


def run(model: str, data: str, out: str, steps: int, batch: int, cached: bool) -> dict:
    cmd = [sys.executable, "-m", "unclip_jax.cli", "train", "decoder", "--model", model, "--data", data,
           "--out", out, "--steps", str(steps), "--batch-size", str(batch), "--save-every", str(steps + 1), *FLAGS]
    if cached:
        cmd.append("--cache-latents")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [json.loads(line)["steps_per_s"] for line in f][5:]
    encode = re.search(r"of \d+ records in (\d+) s", done.stderr)
    return {"s_per_step": 1.0 / statistics.median(rates), "encode_s": float(encode.group(1)) if encode else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="an unCLIP pipeline folder (default: the default model's)")
    p.add_argument("--pictures", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    if args.steps < 10:
        raise SystemExit("--steps must be at least 10 (the first 5 are left out)")
    from unclip_jax.toy import default
    from unclip_jax.toy.domain import write_dataset

    model = args.model or default.pipeline_folder("unclip")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(os.path.join(tmp, "shapes"), args.pictures, seed=0)
        plain = run(model, data, os.path.join(tmp, "plain"), args.steps, args.batch, cached=False)
        cached = run(model, data, os.path.join(tmp, "cached"), args.steps, args.batch, cached=True)
    saved = plain["s_per_step"] - cached["s_per_step"]
    print(f"model {model}, {args.pictures} pictures, batch {args.batch}")
    print(f"per step: plain {plain['s_per_step']:.3f} s, --cache-latents {cached['s_per_step']:.3f} s "
          f"(ratio {cached['s_per_step'] / plain['s_per_step']:.2f}); encoding every picture once: "
          f"{cached['encode_s']:.0f} s" + (f", repaid after {cached['encode_s'] / saved:.0f} steps" if saved > 0 else ""))


if __name__ == "__main__":
    main()
