"""TrainPilot's training program: one trial, GPT on DeepSpeed, Prometheus metrics on rank 0.

Run it with `python -m trainpilot_trainer` (config from $TRAINPILOT_TRIAL_CONFIG or --config).
See docs/trainer.md for the config fields, metrics, exit codes and checkpoint layout.
"""

__version__ = "0.1.0"
