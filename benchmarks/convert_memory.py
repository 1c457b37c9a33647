"""Peak memory of converting one real-size component: the SD 2.1 unCLIP UNet in fp16.

    python benchmarks/convert_memory.py [--workdir DIR] [--keep]

Writes a random-weight fp16 `diffusion_pytorch_model.safetensors` with the real config's tensor names
and shapes (shapes from diffusers' model built on torch's `meta` device, so nothing real-size is
allocated by torch; data drawn with numpy, one tensor at a time), then converts it to fp16 orbax params
in a fresh process with `unclip_jax.conversion.convert_component` and reports that process's peak RSS
(ru_maxrss) against its RSS before converting and the weights' size. Target: the conversion's own peak
(peak minus the baseline) is at most about two copies of the weights. Needs ~4 GB of RAM and disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "benchmarks" / "configs" / "unet_sd21_unclip.json"

CHILD = """
import json, os, resource, sys, time
import jax  # imported before the baseline: the runtime's own footprint is not the conversion's
from unclip_jax.conversion import convert_component

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

src, dst = sys.argv[1:]
base = rss()
t = time.time()
convert_component(src, dst, dtype="fp16")
print(json.dumps({"baseline": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.time() - t}))
"""


def state_dict_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    import torch  # noqa: PLC0415
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_random_fp16(shapes: dict[str, tuple[int, ...]], path: Path, seed: int = 0) -> int:
    """Streams a safetensors file of N(0, 0.02) fp16 tensors (the format: u64 header size, JSON header,
    raw data); returns the data's size in bytes. Writing streams so that this process stays small."""
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = int(np.prod(shapes[name], dtype=np.int64)) * 2
        header[name] = {"dtype": "F16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(shapes):
            f.write((rng.standard_normal(shapes[name], dtype=np.float32) * 0.02).astype(np.float16).tobytes())
    return offset


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the files written")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert-memory-"))
    src, dst = work / "unet", work / "unet-orbax"
    try:
        src.mkdir(parents=True, exist_ok=True)
        config = json.loads(CONFIG.read_text())
        (src / "config.json").write_text(json.dumps(config))
        weights = write_random_fp16(state_dict_shapes(config), src / "diffusion_pytorch_model.safetensors")
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], capture_output=True, text=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        m = json.loads(r.stdout.strip().splitlines()[-1])
        gib = 2.0 ** 30
        own = m["peak"] - m["baseline"]
        print(f"SD 2.1 unCLIP UNet, fp16 -> fp16 orbax: weights {weights / gib:.2f} GiB; "
              f"process RSS before {m['baseline'] / gib:.2f} GiB, peak {m['peak'] / gib:.2f} GiB; "
              f"conversion's own peak {own / gib:.2f} GiB = {own / weights:.2f} x the weights "
              f"({m['seconds']:.0f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
