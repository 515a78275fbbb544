"""Model FLOPs utilisation: the model's training FLOPs per token against the device's peak.

FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B), as nanoGPT does: a forward and
backward pass cost 6 FLOPs per parameter that takes part in a matmul, plus 12 * n_layer * n_embd *
block_size for attention's score and value products (counted as full attention, the convention, though
causal kernels skip half). The parameters are all but the position embeddings: the token embedding
counts once, for the tied output head's matmul (the lookup itself is free). A vocabulary padded for
speed is not counted: MFU measures useful work. Peaks are NVIDIA's dense (no sparsity) figures per
GPU, by the precision the matmuls run in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TERA = 1e12


@dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s of one GPU: bf16 and fp16 tensor cores, TF32 tensor cores, plain fp32."""

    bf16: float | None
    fp16: float
    tf32: float | None
    fp32: float


# Matched against torch.cuda.get_device_name() in order (first match wins), case-insensitively.
PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"\bB200\b", Peak(bf16=2250.0, fp16=2250.0, tf32=1100.0, fp32=75.0)),
    (r"\bH100\b.*\bPCIe\b", Peak(bf16=756.5, fp16=756.5, tf32=378.0, fp32=51.2)),
    (r"\bH100\b.*\bNVL\b", Peak(bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)),
    (r"\b(H100|H200|GH200|H800)\b", Peak(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),
    (r"\bA100\b", Peak(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),
    (r"\bL40S\b", Peak(bf16=362.1, fp16=362.1, tf32=183.0, fp32=91.6)),
    (r"\bL4\b", Peak(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (r"\bA10\b", Peak(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),
    (r"\bV100\b", Peak(bf16=None, fp16=125.0, tf32=None, fp32=15.7)),
    (r"\bT4\b", Peak(bf16=None, fp16=65.0, tf32=None, fp32=8.1)),
)


def flops_per_token(n_layer: int, n_embd: int, block_size: int, parameters: int, position_parameters: int) -> float:
    """Training FLOPs (forward and backward) per token: 6 N + 12 L d T."""
    return 6.0 * (parameters - position_parameters) + 12.0 * n_layer * n_embd * block_size


def device_peak(device_name: str) -> Peak | None:
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def peak_flops(device_name: str, precision: str, tf32: bool) -> float | None:
    """FLOP/s one device can reach in `precision` (fp32 matmuls in TF32 when `tf32`); None: unknown."""
    peak = device_peak(device_name)
    if peak is None:
        return None
    if precision == "bf16":
        tflops = peak.bf16
    elif precision == "fp16":
        tflops = peak.fp16
    else:
        tflops = peak.tf32 if tf32 and peak.tf32 is not None else peak.fp32
    return None if tflops is None else tflops * TERA


def mfu(tokens_per_second_per_device: float, flops_per_token_: float, peak: float) -> float:
    """The share of the device's peak that the model's own FLOPs use."""
    return tokens_per_second_per_device * flops_per_token_ / peak
