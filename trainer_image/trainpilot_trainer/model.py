"""A small GPT-style decoder: token + position embeddings, pre-norm blocks, tied output head.

Written to be read in one sitting. Attention goes through `F.scaled_dot_product_attention`, so
the same code uses flash/memory-efficient kernels on a GPU and the plain math path on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GPTShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    dropout: float = 0.0
    # Embedding rows rounded up to a multiple of this (tensor-core-friendly head matmuls); the
    # extra rows are zero and sliced off the logits, so the model is the unpadded one.
    pad_vocab_multiple: int = 1
    # Positions per chunk of the head and loss (0: all at once); see GPT.forward.
    loss_chunk: int = 0

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_multiple) * self.pad_vocab_multiple


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.n_head = shape.n_head
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.n_embd, 3 * shape.n_embd)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd)
        self.resid_dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        # (B, T, 3C) -> three (B, heads, T, head_dim) tensors.
        q, k, v = self.qkv(x).view(batch, time, 3, self.n_head, channels // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, time, channels)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.up = nn.Linear(shape.n_embd, 4 * shape.n_embd)
        self.down = nn.Linear(4 * shape.n_embd, shape.n_embd)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.ln_attn = nn.LayerNorm(shape.n_embd)
        self.attn = CausalSelfAttention(shape)
        self.ln_mlp = nn.LayerNorm(shape.n_embd)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.shape = shape
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.n_embd)
        self.position_embedding = nn.Embedding(shape.block_size, shape.n_embd)
        self.dropout = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_final = nn.LayerNorm(shape.n_embd)
        self.head = nn.Linear(shape.n_embd, shape.vocab_size, bias=False)
        # Tying input and output embeddings saves vocab x n_embd parameters and trains better small.
        self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2's trick: shrink the residual projections so the residual stream's variance does
        # not grow with depth.
        for name, parameter in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * shape.n_layer))
        self._pad_vocabulary()

    def _pad_vocabulary(self) -> None:
        """Zero rows after the real ones, added once every weight is drawn: the model starts, and
        trains, exactly as the unpadded one (nothing reads those rows or sends them a gradient)."""
        extra = self.shape.padded_vocab - self.shape.vocab_size
        if extra == 0:
            return
        weight = self.token_embedding.weight
        padded = nn.Parameter(torch.cat([weight.data, weight.data.new_zeros(extra, weight.shape[1])]))
        self.token_embedding.weight = self.head.weight = padded
        self.token_embedding.num_embeddings = self.head.out_features = self.shape.padded_vocab

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats over every position of the batch."""
        time = idx.shape[1]
        positions = torch.arange(time, device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        hidden = self.ln_final(x).reshape(-1, self.shape.n_embd)
        targets = targets.reshape(-1)
        chunk = self.shape.loss_chunk
        if not chunk or chunk >= len(targets):
            return self._loss_sum(hidden, targets) / len(targets)
        # In chunks, each recomputed in backward: the fp32 logits of one chunk exist at a time, not
        # the whole batch's (positions x vocab x 4 bytes, a third of the step's memory at GPT-2 size).
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), chunk):
            total = total + checkpoint(
                self._loss_sum, hidden[start : start + chunk], targets[start : start + chunk], use_reentrant=False
            )
        return total / len(targets)

    def _loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)[:, : self.shape.vocab_size]
        # Float32 for the loss: under bf16 the log-softmax would lose the digits we compare to the floor.
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices (and the embeddings), never biases or LayerNorm gains."""
        decay, no_decay = [], []
        for parameter in self.parameters():  # tied weights appear once here
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
        return [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]

    def num_parameters(self) -> int:
        """The model's parameters, without the embedding's padding rows (never used)."""
        padding = (self.shape.padded_vocab - self.shape.vocab_size) * self.shape.n_embd
        return sum(parameter.numel() for parameter in self.parameters()) - padding
