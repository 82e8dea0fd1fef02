"""Small models used by the tests (and by examples and benchmarks): an MLP, an F.linear model, tied
weights, and a nanoGPT-style transformer (attention with an SDPA path and a manual path)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """The torchmx README's nn.Sequential, as a module."""

    def __init__(self, d: int = 64, hidden: int = 128, out: int = 32, bias: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, out, bias=bias))

    def forward(self, x):
        return self.net(x)


class FunctionalLinear(nn.Module):
    """Calls F.linear on its own parameters (no nn.Linear), returns a tuple and a dict."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(96, d) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.randn(96) * 0.1)
        self.w2 = nn.Parameter(torch.randn(d, 96) / math.sqrt(96))

    def forward(self, x, scale: float = 1.0):
        h = F.gelu(F.linear(x, self.w1, self.b1))
        return F.linear(h, self.w2) * scale, {"hidden": h}


class TiedLM(nn.Module):
    """An embedding whose weight the output head shares (tied weights)."""

    def __init__(self, vocab: int = 128, d: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.proj(self.wte(idx))))


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: an SDPA ("flash") path and a manual matmul path."""

    def __init__(self, d: int, n_head: int, flash: bool = True) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_head, self.d, self.flash = n_head, d, flash

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
            att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, flash: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head, flash)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.gelu = nn.GELU()
        self.mlp.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A nanoGPT-style transformer (learned positions, pre-LN blocks, tied lm_head)."""

    def __init__(self, vocab: int = 256, d: int = 64, n_layer: int = 2, n_head: int = 4, block_size: int = 64, flash: bool = True) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block_size, d),
            h=nn.ModuleList([Block(d, n_head, flash) for _ in range(n_layer)]), ln_f=nn.LayerNorm(d),
        ))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class FragileMLP(nn.Module):
    """An MLP whose second layer `b` is deliberately fragile under MX: its input carries one huge
    channel per 32-block (a "massive activation") whose weights are zero, so block scaling crushes
    the small channels that `b`'s output depends on."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 16)
        with torch.no_grad():
            self.b.weight[:, ::32] = 0.0
        self.register_buffer("boost", torch.ones(128).index_fill(0, torch.arange(0, 128, 32), 1000.0))

    def forward(self, x):
        h = torch.relu(self.a(x)) * self.boost
        return self.d(torch.relu(self.c(torch.relu(self.b(h)))))
