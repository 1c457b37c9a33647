"""A run killed with SIGKILL (mid-save, and at a random step) and resumed ends bit for bit where an
uninterrupted run ends: same final params, same metrics.jsonl (timings aside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tiny_objective

RUN = os.path.join(os.path.dirname(__file__), "run_tiny.py")
STEPS = 12
TIMINGS = ("steps_per_s", "samples_per_s")


def _env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = ""  # one CPU device is enough here, and faster to start
    return env


def _run(data, out, *extra, env=None):
    return subprocess.run([sys.executable, RUN, str(data), str(out), str(STEPS), *extra], env=env or _env(),
                          capture_output=True, text=True, timeout=300)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def _final(out):
    with np.load(os.path.join(out, "final", "params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data folder, the uninterrupted run's OUT)."""
    tmp = tmp_path_factory.mktemp("resume")
    data = tiny_objective.write_folder(str(tmp / "data"))
    ref = tmp / "ref"
    done = _run(data, ref)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in _metrics(ref)] == list(range(1, STEPS + 1))
    return data, ref


def test_killed_and_resumed_run_equals_uninterrupted(reference, tmp_path):
    data, ref = reference

    out = tmp_path / "killed"
    # 1. killed while step 6's checkpoint is being written (the write runs in orbax's background thread).
    killed = _run(data, out, "--kill-after-save", "6")
    assert killed.returncode == -signal.SIGKILL
    listed = sorted(os.listdir(out / "checkpoints"))
    mid_save = "6" not in listed  # the usual case: only 6's temporary folder exists
    # 2. resumed, then killed from outside at a random step after its first new metrics line.
    env = {**_env(), "TINY_COLLATE_DELAY": "0.15"}
    proc = subprocess.Popen([sys.executable, RUN, str(data), str(out), str(STEPS), "--resume"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = int(np.random.default_rng().integers(7, STEPS))
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline:
        lines = open(metrics).read().splitlines() if metrics.exists() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= target:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_resume = proc.stderr.read()
    if mid_save:
        assert "resumed from step 3" in first_resume, (listed, first_resume)
    # 3. resumed to the end.
    resumed = _run(data, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr

    assert _metrics(out) == _metrics(ref)  # every field but the timings, exactly
    got, want = _final(out), _final(ref)
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    # No temporary checkpoint folder is left, and only complete steps are listed.
    assert all(name.isdigit() for name in os.listdir(out / "checkpoints"))


def test_resume_of_another_objective_is_refused(reference):
    from unclip_jax.training.checkpoint import Checkpoints, ResumeError, check_compatible

    ck = Checkpoints(str(reference[1]), every=3, keep=2)
    meta = ck.read_meta(ck.latest_step())
    ck.close()
    with pytest.raises(ResumeError, match="'tiny' run"):
        check_compatible(meta, objective="decoder", model="m", trainable_signature=meta["signature"], where="x")
    with pytest.raises(ResumeError, match="trainable params differ"):
        check_compatible(meta, objective="tiny", model="m", trainable_signature="0" * 16, where="x")
