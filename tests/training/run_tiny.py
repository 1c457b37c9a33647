"""`python run_tiny.py DATA OUT STEPS [--resume] [--kill-after-save N]`: a training run of the tiny objective
(a subprocess of test_resume.py). --kill-after-save N: SIGKILL this process right after starting to save
step N's checkpoint (orbax writes it in the background, so the kill lands mid-save)."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

import tiny_objective  # noqa: E402

from unclip_jax.training import checkpoint  # noqa: E402
from unclip_jax.training.loop import RunConfig, train  # noqa: E402
from unclip_jax.training.step import StepConfig  # noqa: E402


def main():
    data, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kill_at = int(sys.argv[sys.argv.index("--kill-after-save") + 1]) if "--kill-after-save" in sys.argv else None
    if kill_at is not None:
        save = checkpoint.Checkpoints.save

        def save_then_die(self, step, state, meta):
            save(self, step, state, meta)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.Checkpoints.save = save_then_die
    config = RunConfig(objective="tiny", model="tiny", data=data, out=out, batch_size=2, seed=3, save_every=3,
                       keep=2, resume="--resume" in sys.argv, resolution=16, random_flip=True,
                       step=StepConfig(steps=steps, learning_rate=0.05, lr_scheduler="cosine", lr_warmup_steps=2,
                                       gradient_accumulation_steps=2, ema_decay=0.9))
    train(config, load=tiny_objective.load, build=tiny_objective.build)


if __name__ == "__main__":
    main()
