"""TrainPilot: an AI agent that runs training experiments, on Kubernetes or on one machine."""

__version__ = "0.1.0"
