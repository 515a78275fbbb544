"""The Prometheus exporter: the contract's trainpilot_* metrics, served by rank 0 only.

Every rank keeps a `Metrics` (updating a gauge costs about a microsecond, cheaper than asking
"am I rank 0?" everywhere); only rank 0 starts the HTTP server. Own CollectorRegistry: no
process/platform collectors, nothing but the contract's names.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from trainpilot.api import contract

STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(
        self,
        max_steps: int,
        loss_floor: float | None = None,
        cuda: bool = False,
        validation: tuple[int, int] | None = None,
        entropy_rate: float | None = None,
        mfu: bool = False,
    ):
        """`validation`: the validation set's fingerprint and its number of scored tokens; `mfu`:
        whether the device's peak is known, so that MFU means something."""
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        def gauge(name: str, documentation: str, value: float) -> Gauge:
            metric = Gauge(name, documentation, registry=registry)
            metric.set(value)
            return metric

        self.step = gauge(contract.METRIC_STEP, "Optimizer steps completed.", 0)
        self.max_steps = gauge(contract.METRIC_MAX_STEPS, "Optimizer steps this trial runs to.", max_steps)
        self.train_loss = gauge(contract.METRIC_TRAIN_LOSS, "Training loss of the last step (nats/token).", math.nan)
        self.val_loss = gauge(
            contract.METRIC_VAL_LOSS, "Loss on the fixed validation batches (nats/token); NaN until measured.", math.nan
        )
        self.eval_step = gauge(contract.METRIC_EVAL_STEP, "Step of the last validation loss; -1: none yet.", -1)
        self.rung_step = gauge(contract.METRIC_RUNG_STEP, "Last of eval_at_steps evaluated at; -1: none yet.", -1)
        self.rung_val_loss = gauge(
            contract.METRIC_RUNG_VAL_LOSS, "Validation loss at trainpilot_rung_step; NaN until then.", math.nan
        )
        self.learning_rate = gauge(contract.METRIC_LEARNING_RATE, "Learning rate of the last step.", math.nan)
        self.weight_decay = gauge(contract.METRIC_WEIGHT_DECAY, "AdamW weight decay of the decayed groups.", math.nan)
        self.grad_norm = gauge(contract.METRIC_GRAD_NORM, "Global gradient norm before clipping.", math.nan)
        self.tokens_per_second = gauge(contract.METRIC_TOKENS_PER_SECOND, "Training throughput, all ranks.", 0)
        self.checkpoint_step = gauge(contract.METRIC_CHECKPOINT_STEP, "Step of the last checkpoint; -1: none.", -1)
        self.control_generation = gauge(
            contract.METRIC_CONTROL_GENERATION, "Generation of the last control file applied; 0: none.", 0
        )
        # prometheus_client appends _total to counters: this exposes trainpilot_nonfinite_loss_total.
        self.nonfinite_loss = Counter(
            contract.METRIC_NONFINITE_LOSS.removesuffix("_total"),
            "Steps whose loss was NaN or infinite.",
            registry=registry,
        )
        self.loss_spikes = Counter(
            contract.METRIC_LOSS_SPIKES.removesuffix("_total"),
            "Steps whose smoothed loss was above loss_spike_factor x the run's best.",
            registry=registry,
        )
        self.step_seconds = Histogram(
            contract.METRIC_STEP_SECONDS,
            "Wall time of one optimizer step.",
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        # Present only when meaningful, so a scraper can tell "unknown" from a value.
        self.loss_floor = (
            None
            if loss_floor is None
            else gauge(
                contract.METRIC_LOSS_FLOOR, "Best achievable loss on the validation windows, nats/token.", loss_floor
            )
        )
        if entropy_rate is not None:
            gauge(contract.METRIC_ENTROPY_RATE, "Entropy rate of the synthetic source, nats/token.", entropy_rate)
        self.gpu_memory = self.gpu_memory_peak = self.gpu_memory_reserved = self.tokens_per_gpu = None
        if cuda:
            self.gpu_memory = gauge(contract.METRIC_GPU_MEMORY, "torch.cuda.memory_allocated() on rank 0.", 0)
            self.gpu_memory_peak = gauge(
                contract.METRIC_GPU_MEMORY_PEAK, "torch.cuda.max_memory_allocated() on rank 0.", 0
            )
            self.gpu_memory_reserved = gauge(
                contract.METRIC_GPU_MEMORY_RESERVED, "torch.cuda.memory_reserved() on rank 0.", 0
            )
            self.tokens_per_gpu = gauge(contract.METRIC_TOKENS_PER_SECOND_PER_GPU, "Training throughput per GPU.", 0)
        self.mfu = (
            gauge(contract.METRIC_MFU, "Model FLOPs utilisation: model FLOP/s over the GPU's dense peak.", 0)
            if mfu
            else None
        )
        if validation is not None:
            fingerprint, tokens = validation
            gauge(contract.METRIC_VALIDATION_FINGERPRINT, "48-bit hash of the validation windows' tokens.", fingerprint)
            gauge(contract.METRIC_VALIDATION_TOKENS, "Predictions scored by one validation pass.", tokens)
        self._server = None

    def serve(self, addr: str, port: int) -> int:
        """Start /metrics in a daemon thread; returns the bound port (useful when port is 0)."""
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
