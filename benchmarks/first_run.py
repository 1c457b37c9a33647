"""A new user's first and second run, measured in one go: `python benchmarks/first_run.py [--reps 3]`.

  help     `unclip-jax --help` wall time, in a fresh process (target: under 1 s)
  txt2img  the README's main job (`unclip-jax txt2img "a photo of a cat" --model tiny-unclip --steps 4
           --prior-steps 4`) in a fresh process, twice in a row with the persistent compilation cache in an
           empty temporary folder: the first run compiles and fills the cache, the second loads from it
           (target: the second at most 25% of the first's wall time)

Every process is `python -m unclip_jax.cli` with this interpreter (whichever unclip_jax it imports: a
checkout on PYTHONPATH or an installed wheel). Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a photo of a cat"


def _timed(args: list[str], env: dict) -> float:
    return _run(args, env)[0]


def _run(args: list[str], env: dict) -> tuple[float, str]:
    """(wall seconds, what the command said: its `loaded ... in` and `generated ... in` times)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "unclip_jax.cli", *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"first_run: `unclip-jax {' '.join(args)}` failed:\n{r.stderr}")
    parts = re.findall(r"^(loaded|generated)\b.* in ([0-9.]+)s$", r.stderr, re.M)
    return seconds, ", ".join(f"{what} {t} s" for what, t in parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="--help timings (median reported; default 3)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, UNCLIP_JAX_CACHE_DIR=os.path.join(tmp, "jax-cache"))
        helps = [_timed(["--help"], env) for _ in range(args.reps)]
        model = os.path.join(tmp, "tiny-unclip")
        _timed(["tiny", model], env)
        job = ["txt2img", PROMPT, "--model", model, "--steps", "4", "--prior-steps", "4", "--out",
               os.path.join(tmp, "out")]
        first, first_parts = _run(job, env)
        entries = len([n for n in os.listdir(env["UNCLIP_JAX_CACHE_DIR"]) if n.endswith("-cache")])
        second, second_parts = _run(job, env)
        uncached, uncached_parts = _run([*job, "--no-compile-cache"], env)
    ratio = second / first
    rows = [
        ("`unclip-jax --help`", f"{statistics.median(helps):.2f} s (median of {args.reps})", "< 1 s",
         "met" if statistics.median(helps) < 1 else "NOT met"),
        ("README txt2img, first run (empty cache)", f"{first:.1f} s", "",
         f"{first_parts}; {entries} cache entries written"),
        ("README txt2img, second run (cache filled)", f"{second:.1f} s ({ratio:.0%} of the first)", "<= 25%",
         f"{second_parts}; {'met' if ratio <= 0.25 else 'NOT met'}"),
        ("README txt2img, `--no-compile-cache`", f"{uncached:.1f} s", "", f"{uncached_parts}; every run before"),
    ]
    print("| measurement | wall time | target | |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\npython {sys.version.split()[0]}, {os.cpu_count()} CPUs visible")
    return 0


if __name__ == "__main__":
    sys.exit(main())
