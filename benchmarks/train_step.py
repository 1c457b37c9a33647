"""One training step of the real-size Stable unCLIP decoder UNet, JAX vs the diffusers PyTorch step.

    python benchmarks/train_step.py [--config unet_sd21_unclip.json] [--resolution 512] [--batch 1] [--repeat 2]

The step on both sides: the UNet's forward and backward pass on noisy latents [B, R/8, R/8, 4] with a text
context [B, 77, D] and the noise-augmented image embedding as class labels, an MSE loss against a target,
gradient clipping to norm 1 and one AdamW update (diffusers' train_text_to_image defaults), fp32, random
weights, the same numpy batch. The VAE encode and the CLIP encoders are not timed (they run without
gradients and equally on both sides). JAX runs `unclip_jax.training.step.train_step` (the command's step)
with a minimal decoder-UNet loss; PyTorch runs the same computation with diffusers' UNet2DConditionModel
and torch.optim.AdamW. The two sides run one after the other in separate processes (each needs the UNet,
its gradients and two AdamW moments in memory: about 14 GB at SD 2.1 size), then the ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "fixtures", "configs")


def batch(config: dict, resolution: int, b: int):
    import numpy as np

    rng = np.random.default_rng(0)
    f = 8
    h = resolution // f
    c = config["in_channels"]
    d = config["cross_attention_dim"]
    p = config.get("projection_class_embeddings_input_dim") or 0
    return {"latents": rng.standard_normal((b, h, h, c), np.float32),
            "target": rng.standard_normal((b, h, h, config.get("out_channels", 4)), np.float32),
            "timesteps": rng.integers(0, 1000, (b,)).astype(np.int32),
            "context": rng.standard_normal((b, 77, d), np.float32),
            "class_labels": rng.standard_normal((b, p), np.float32) if p else None}


def run_jax(config: dict, args) -> dict:
    import jax
    import jax.numpy as jnp

    from unclip_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel, dummy_inputs
    from unclip_jax.sharding import Layout, make_mesh
    from unclip_jax.training import step as S
    from unclip_jax.training.objective import Objective

    model = UNet2DConditionModel(UNet2DConditionConfig.from_dict(config), remat=args.remat)
    params = jax.jit(model.init)(jax.random.key(0), *dummy_inputs(model.config))["params"]
    data = {k: v for k, v in batch(config, args.resolution, args.batch).items() if v is not None}

    def loss(trainable, frozen, b, key):
        out = model.apply({"params": trainable}, b["latents"], b["timesteps"], b["context"], b.get("class_labels"))
        return jnp.mean((out.astype(jnp.float32) - b["target"]) ** 2), {}

    objective = Objective("decoder-unet", None, None, None, loss, None, object)
    sc = S.StepConfig(steps=10, lr_warmup_steps=0, ema_decay=None)
    layout = Layout(make_mesh(devices=jax.devices()[:1]))
    state = S.init_state(sc, params, 0)
    t = time.perf_counter()
    fn = S.compile_step(objective, sc, layout, state, {}, data).lower(state, {}, data).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(args.repeat + 1):
        t = time.perf_counter()
        state, m = fn(state, {}, data)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    return {"side": "jax", "compile_s": compile_s, "step_s": min(times[1:]), "times": times, "loss": float(m["loss"])}


def run_torch(config: dict, args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    if args.remat:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    b = batch(config, args.resolution, args.batch)
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    latents, target = nchw(b["latents"]), nchw(b["target"])
    t_, ctx = torch.from_numpy(b["timesteps"]).long(), torch.from_numpy(b["context"])
    cls = None if b["class_labels"] is None else torch.from_numpy(b["class_labels"])
    times = []
    for _ in range(args.repeat + 1):
        t = time.perf_counter()
        out = unet(latents, t_, ctx, class_labels=cls).sample
        loss = torch.nn.functional.mse_loss(out.float(), target, reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return {"side": "torch", "step_s": min(times[1:]), "times": times, "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="unet_sd21_unclip.json", help="a UNet config.json: a path, or a name under tests/fixtures/configs")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="timed steps after one warm-up step (the best is kept)")
    p.add_argument("--remat", action="store_true", help="rematerialised blocks on both sides")
    p.add_argument("--side", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    with open(args.config if os.path.isfile(args.config) else os.path.join(CONFIGS, args.config)) as f:
        config = json.load(f)
    if args.side:
        result = (run_jax if args.side == "jax" else run_torch)(config, args)
        print(json.dumps(result))
        return 0
    results = {}
    for side in ("jax", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[side]))
    jax_s, torch_s = results["jax"]["step_s"], results["torch"]["step_s"]
    print(f"train step {args.config} {args.resolution}px batch {args.batch}: JAX {jax_s:.2f} s, "
          f"PyTorch {torch_s:.2f} s, ratio {jax_s / torch_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
