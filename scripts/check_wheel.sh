#!/usr/bin/env bash
# The package as a user installs it: build a wheel from this checkout, install it into a fresh venv outside
# the checkout (no torch), and run the CLI's main job (the default model shipped in the wheel, no --model)
# twice and the benchmark's tiny mode (JAX side) from another folder, so that nothing of the checkout is
# importable. A few minutes, mostly pip.
#
#   scripts/check_wheel.sh            # a fresh venv in a temporary folder
#   VENV=/tmp/v scripts/check_wheel.sh   # reuse (or create) that venv: only the wheel is reinstalled
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python="${PYTHON:-python3}"
venv="${VENV:-$work/venv}"

"$python" -m pip wheel "$repo" --no-deps -q -w "$work/dist"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --force-reinstall --no-deps "$work"/dist/*.whl
"$venv/bin/pip" install -q "$work"/dist/*.whl   # its dependencies, when the venv lacks them

cd "$work"
unset PYTHONPATH
export UNCLIP_JAX_CACHE_DIR="$work/jax-cache"
"$venv/bin/python" -c "import unclip_jax, sys; assert '$repo' not in unclip_jax.__file__, unclip_jax.__file__"
"$venv/bin/unclip-jax" --help > /dev/null
"$venv/bin/python" -c "from unclip_jax.toy import default; [default.check_shipped(n) for n in default.NAMES]"
for run in 1 2; do   # the README's main job, twice in a row (the second reuses the materialised model)
  "$venv/bin/unclip-jax" txt2img "a red circle on a blue background" --out out 2> "$work/stderr"
  if grep -q "PyTorch was not found" "$work/stderr"; then echo "transformers' PyTorch warning shown"; exit 1; fi
done
[ "$(ls out/*.png | wc -l)" -eq 2 ]
[ "$(ls -d "$UNCLIP_JAX_CACHE_DIR"/default-model/unclip-* | wc -l)" -eq 1 ]
"$venv/bin/python" "$repo/benchmarks/bench.py" --tiny --jax-only --reps 1 --pipeline-reps 1
echo "check_wheel: ok"
