"""The toy domain of the default model (issue 18): a fixed, checkable world of coloured shapes.

domain.py   the pictures, captions, held-out combinations, depth scenes and the imagefolder writer
measure.py  the measures tests apply to generated pictures (palette colours, shape class, depth correlation)
init.py     the model family's configs and the random-weight pipeline folders its training starts from
objectives.py  the vae and dpt training objectives (training contract), with their losses
evaluate.py the issue's criteria as numbers on loaded pipelines (tests/test_default_model.py; a CLI)

See README.md beside this file, and scripts/train_default_model.py for the training plan.
"""
