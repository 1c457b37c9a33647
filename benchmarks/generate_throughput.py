"""Throughput of `unclip_jax.generation` on the tiny txt2img model (random weights, CPU).

    python benchmarks/generate_throughput.py                   # loop vs generator, then 1/2/4/8 devices
    python benchmarks/generate_throughput.py --items 64 --batch-size 8 --steps 4 --devices 1,2,4,8

1. The generator (per-item draws, PNG + index writes, resumable bookkeeping) against a plain Python loop
   of pipeline calls at the same batch size (one key per call, images kept in memory), both on every
   device of the process, after one warm-up call each (compilation is not timed). Calls alternate
   loop / generator so that load from other processes falls on both alike; medians are reported.
2. Scaling: the generator in a fresh process per device count, XLA_FLAGS=
   --xla_force_host_platform_device_count=N, the batch split over N forced CPU devices. Forced CPU
   devices share the machine's cores: the figure shows the overhead of splitting, not a speed-up that
   real accelerators would give.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _worker(args) -> dict:
    import jax

    import unclip_jax
    from unclip_jax.generation.items import make_item
    from unclip_jax.generation.run import BatchRunner, generate
    from unclip_jax.tiny import write_tiny

    tmp = tempfile.mkdtemp(prefix="gen-bench-")
    pipe, params = unclip_jax.StableUnCLIPPipeline.from_pretrained(write_tiny("unclip", os.path.join(tmp, "model")))
    defaults = dict(num_inference_steps=args.steps, guidance_scale=3.0, negative_prompt=None, eta=0.0,
                    noise_level=0, prior_num_inference_steps=args.steps, prior_guidance_scale=4.0, height=None,
                    width=None)
    prompts = [f"prompt number {i}" for i in range(args.items)]
    items = [make_item(i, {"prompt": p}, pipeline="txt2img", defaults=defaults, seed=0, where=str(i))
             for i, p in enumerate(prompts)]
    runner = BatchRunner(pipe, params, "txt2img")
    b = args.batch_size

    def loop():
        for n in range(0, len(prompts), b):
            pipe(prompts[n:n + b], params=runner.params, key=jax.random.key(n), mesh=runner.mesh,
                 num_inference_steps=args.steps, prior_num_inference_steps=args.steps, guidance_scale=3.0,
                 output_type="np", progress_bar=False)

    runs = iter(range(1000))

    def gen():
        generate(runner, items, out=os.path.join(tmp, f"out{next(runs)}"), batch_size=b, progress=False,
                 log=lambda m: None)

    times = {"loop": [], "generate": []}
    fns = {"loop": loop, "generate": gen}
    for name in fns:  # warm-up: compiles
        fns[name]()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {"devices": jax.device_count(), "items": args.items, "batch_size": b, "steps": args.steps,
            "seconds": times,
            "items_per_s": {k: args.items / statistics.median(v) for k, v in times.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="prior and decoder steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", default="1,2,4,8", help="forced CPU device counts for the scaling part")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    results = []
    for n in [int(x) for x in args.devices.split(",")]:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        cmd = [sys.executable, __file__, "--worker", "--items", str(args.items), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        ips = r["items_per_s"]
        print(f"{n} device(s): generator {ips['generate']:.2f} items/s, loop of pipeline calls {ips['loop']:.2f} "
              f"items/s (generator / loop {ips['generate'] / ips['loop']:.2f})", flush=True)
    base = results[0]["items_per_s"]["generate"]
    print("scaling (generator items/s relative to 1 device): " +
          ", ".join(f"{r['devices']}: {r['items_per_s']['generate'] / base:.2f}" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
