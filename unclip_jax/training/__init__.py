"""Training: objectives, the train step, data, checkpoint/resume, EMA and validation."""
