"""The policy benchmark (bench/policies.py): tasks and their learning-curve surrogate, the baseline
searches people run today, the harness that runs whole experiments under each, and the figures."""
