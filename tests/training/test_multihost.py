"""Several processes: a run of two JAX processes on this machine (one CPU device each, gloo collectives,
`jax.distributed` through the train command's --distributed options) equals a run of one process with two
devices, bit for bit: the same metrics.jsonl lines, validation grids and final params, with an unreadable
image in the data, a param sharded across the processes (--fsdp 2), and a save and resume in between.
Each process reads only its rows of every batch; process 0 alone writes the metrics.

`python test_multihost.py OUT ARGS...` is the worker (a subprocess of the tests): the tiny objective of
the other machinery tests, plus a 2048-element param that --fsdp shards and a stand-in validation
pipeline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

import tiny_objective

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TIMINGS = ("steps_per_s", "samples_per_s")
PAD = 2048  # >= sharding.MIN_FSDP_SIZE: --fsdp 2 shards it across the two processes
BAD = 4  # the unreadable image
TIMEOUT = 240  # s per run, on a loaded machine (a run takes ~3 s of CPU per process)


# ---------------------------------------------------------------------------------------------- worker


class ValidationPipe(tiny_objective.TinyPipe):
    """A stand-in validation pipeline: one image per prompt, its pixels a function of the params."""

    def __call__(self, prompts, *, params, key, num_inference_steps, output_type, height, width):
        import types

        import jax.numpy as jnp

        m = params["model"]
        value = jnp.tanh(jnp.mean(m["w"]) + m["b"] + jnp.mean(m["pad"])) * 0.5 + 0.5
        ramp = jnp.linspace(0.0, 1.0, height * width * 3).reshape(height, width, 3)
        image = np.asarray((value * ramp)[None].repeat(len(prompts), 0))
        return types.SimpleNamespace(images=image)


def _worker(out: str, argv: list[str]) -> int:
    """One process of a run: the train command's parser and distributed start, the tiny objective."""
    import argparse
    import dataclasses

    from unclip_jax.training import command, data
    from unclip_jax.training.loop import train

    reads = [0]
    read = data.DataIterator._read

    def counted(self, position):
        reads[0] += 1
        return read(self, position)

    data.DataIterator._read = counted

    def load(model):
        pipe, params = tiny_objective.load(model)
        params["model"]["pad"] = np.random.default_rng(1).normal(size=PAD).astype(np.float32)
        return ValidationPipe(), params

    def loss(trainable, frozen, batch, key):
        import jax.numpy as jnp

        value, metrics = tiny_objective.loss(trainable, frozen, batch, key)
        return value + 0.1 * jnp.mean(trainable["pad"] ** 2), metrics

    objective = dataclasses.replace(tiny_objective.OBJECTIVE, loss=loss, pipeline_class=ValidationPipe)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "decoder", "--model", "tiny", "--out", out, *argv])
    try:
        config = dataclasses.replace(command.config_from_args(args), objective="tiny")
        command.initialize_distributed(args)
        train(config, load=load, build=lambda name, pipe, params, options: (objective, pipe, params))
    except ValueError as e:  # as `unclip-jax train` reports bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"reads": reads[0]}))
    return 0


# ---------------------------------------------------------------------------------------------- tests


def _gloo_missing() -> str | None:
    import jax

    try:
        from jax._src.lib import _jax
    except ImportError:
        return f"jaxlib {jax.__version__}: no _jax extension to look for gloo in"
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return f"jaxlib {jax.__version__} has no gloo CPU collectives"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return env


def _options(data, steps: int, *extra) -> list[str]:
    return ["--data", str(data), "--steps", str(steps), "--batch-size", "2", "--gradient-accumulation-steps",
            "2", "--seed", "3", "--save-every", "2", "--keep", "2", "--resolution", "16", "--random-flip",
            "--learning-rate", "0.05", "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", "2",
            "--ema-decay", "0.9", "--fsdp", "2", "--validation-prompt", "a", "--validation-every", "2", *extra]


def _one(out, argv):
    done = subprocess.run([sys.executable, HERE, str(out), *argv], env=_env(2), capture_output=True, text=True,
                          timeout=TIMEOUT)
    return [done]


def _two(out, argv):
    """Two processes of one run, each with one CPU device; their CompletedProcess-like results."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, HERE, str(out), *argv, "--distributed", "--coordinator-address",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs = [q.communicate()[1][-2000:] for q in procs]
            pytest.fail(f"two processes still running after {TIMEOUT} s; their stderr: {logs}")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def _ok(results):
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(r.stdout.strip().splitlines()[-1])["reads"] for r in results]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def _final(out):
    with np.load(os.path.join(out, "final", "params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tiny_objective.write_folder(str(tmp_path_factory.mktemp("multihost") / "data"), n=10)
    with open(os.path.join(folder, f"{BAD}.png"), "wb") as f:
        f.write(b"not a png")
    return folder


def test_two_processes_equal_one_process_with_two_devices(data, tmp_path):
    why = _gloo_missing()
    if why:
        pytest.skip(why)
    steps = 4
    ref = tmp_path / "one"
    (ref_reads,) = _ok(_one(ref, _options(data, steps)))
    rows = _metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[-1]["skipped"] >= 1  # the unreadable image came up (and was replaced in the batch)

    out = tmp_path / "two"
    first = _ok(_two(out, _options(data, 2)))  # saves at step 2 (and writes a final/ of step 2)
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]
    shutil.rmtree(out / "final")  # the tiny objective's final/ is no pipeline folder, so it is not overwritten
    resumed = _two(out, _options(data, steps, "--resume"))
    _ok(resumed)
    assert all("resumed from step 2" in r.stderr for r in resumed)

    # Every field of every step (timings aside) and the final params: exactly equal. Both runs execute the
    # same partitioned program; each cross-device reduction has two operands (a + b == b + a in IEEE
    # arithmetic), whether XLA's in-process all-reduce or gloo's adds them.
    assert _metrics(out) == rows  # also: one line per step, so process 1 wrote none
    got, want = _final(out), _final(ref)
    assert set(got) == set(want) == {"w", "b", "pad"}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    grids = sorted(os.listdir(ref / "validation"))
    assert grids == ["step-000000.png", "step-000002.png", "step-000004.png"]
    assert sorted(os.listdir(out / "validation")) == grids
    from PIL import Image

    for name in grids:
        assert np.array_equal(np.asarray(Image.open(out / "validation" / name)),
                              np.asarray(Image.open(ref / "validation" / name))), name
    # Each process read only (about) its half of the records a single process read.
    assert ref_reads >= steps * 4
    for reads in np.array(first) + np.array(_ok(resumed)):
        assert reads <= ref_reads // 2 + 2, (first, ref_reads)


def test_a_batch_the_processes_do_not_divide_is_refused_before_the_first_step(data, tmp_path):
    why = _gloo_missing()
    if why:
        pytest.skip(why)
    out = tmp_path / "bad"
    results = _two(out, ["--data", str(data), "--steps", "2", "--batch-size", "3", "--resolution", "16"])
    for r in results:
        assert r.returncode == 2, r.stderr[-2000:]
        assert ("error: --batch-size 3 is not divisible by the 2 devices the batch is split over "
                "(2 processes with 1 each)") in r.stderr
    assert not out.exists()


def test_distributed_options_need_distributed(capsys, data, tmp_path):
    from unclip_jax import cli

    code = cli.main(["train", "decoder", "--model", "m", "--data", str(data), "--out", str(tmp_path / "o"),
                     "--steps", "1", "--batch-size", "1", "--num-processes", "2", "--process-id", "1"])
    assert code == 2
    assert "--num-processes, --process-id: only with --distributed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_processes_reading_their_rows_see_the_single_process_batches(tmp_path):
    """DataIterator.next_batch(rows, exchange) in two threads standing in for processes (the exchange an OR
    behind a barrier) gives, row for row, the batches, position and skip count of one iterator, with
    unreadable records at the processes' boundary, two in a row, and at the end of a batch."""
    from unclip_jax.training.data import DataIterator, open_source

    folder = tiny_objective.write_folder(str(tmp_path / "d"), n=9, captions=[f"c{i}" for i in range(9)])
    for i in (1, 2, 6):
        with open(os.path.join(folder, f"{i}.png"), "wb") as f:
            f.write(b"broken")
    source = open_source(folder)

    def iterator():
        return DataIterator(source, batch_size=4, resolution=16, seed=5, random_flip=True)

    one = iterator()
    want = [one.next_batch() for _ in range(7)]
    barrier, shared, lock = threading.Barrier(2), [None, None], threading.Lock()

    def exchange(me):
        def run(flags):
            shared[me] = flags.copy()
            barrier.wait()
            joined = shared[0] | shared[1]
            barrier.wait()
            return joined
        return run

    results, reads, errors = [[], []], [0, 0], []

    def process(me, rows):
        it = iterator()
        read = it._read

        def counted(position):
            with lock:
                reads[me] += 1
            return read(position)

        it._read = counted
        try:
            for _ in range(7):
                results[me].append(it.next_batch(rows, exchange(me)))
            results[me].append(it.state())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(0, [0, 1])), threading.Thread(target=process, args=(1, [2, 3]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results[0][-1] == results[1][-1] == one.state()
    assert one.skipped >= 4  # each epoch has three unreadable records
    for n, batch in enumerate(want):
        got = results[0][n] + results[1][n]
        assert [e["text"] for e in got] == [e["text"] for e in batch], n
        assert all(np.array_equal(g["image"], w["image"]) for g, w in zip(got, batch)), n
    assert max(reads) < 7 * 4  # neither read every record of every batch


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))
