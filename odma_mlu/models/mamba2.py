"""Mamba2 in pure torch: causal conv, chunked-scan prefill, single-step recurrent decode.

Per sequence, an SSM layer maps new inputs through a causal depthwise conv (kernel
``d_conv``) and then the selective scan::

    prefill (n tokens):  conv over [conv_state | x_1..x_n] -> chunked scan from ssm_state
    decode  (1 token):   conv over [conv_state | x]        -> state = state*exp(dt*A) + dt*B*x
                                                              y = state . C + D*x

The state a request carries between steps is ``conv_state`` [conv_dim, d_conv] (the last
``d_conv`` conv inputs) and ``ssm_state`` [heads, head_dim, d_state] in float32. A first
prefill starts from zeros; a later chunk (or a decode) continues from the slot's state.

The ops follow transformers' reference (torch) path for Bamba (``causal_conv1d_fn``,
``causal_conv1d_update``, ``mamba2_chunk_scan``, ``mamba2_selective_state_update``) op for op,
so greedy output matches ``generate`` token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_prefill(x: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 d_conv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv + SiLU of one sequence's new inputs.

    x [n, conv_dim]; conv_state [conv_dim, d_conv] or None (fresh sequence: zero context);
    weight [conv_dim, d_conv]. Returns (out [n, conv_dim], new conv state [conv_dim, d_conv]).
    """
    n = x.shape[0]
    full = x.t().unsqueeze(0)  # [1, conv_dim, n]
    if conv_state is not None:
        full = torch.cat([conv_state.unsqueeze(0), full], dim=-1)
    elif n < d_conv:
        full = F.pad(full, (d_conv - n, 0), value=0)
    new_state = full[0, :, -d_conv:]
    length = full.shape[-1]
    out = F.conv1d(full.to(weight.dtype), weight.unsqueeze(1), bias, padding=d_conv - 1,
                   groups=weight.shape[0])[:, :, :length]
    out = F.silu(out).to(x.dtype)[:, :, -n:]
    return out[0].t(), new_state


def conv_decode(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One new input per sequence: x [B, conv_dim], conv_state [B, conv_dim, d_conv] ->
    (out [B, conv_dim], new conv state [B, conv_dim, d_conv])."""
    d_conv = conv_state.shape[-1]
    full = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1).to(weight.dtype)  # [B, conv_dim, d_conv + 1]
    new_state = full[:, :, -d_conv:]
    out = F.conv1d(full, weight.unsqueeze(1), bias, padding=0, groups=weight.shape[0])[:, :, -1:]
    return F.silu(out).to(x.dtype)[:, :, 0], new_state


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: sum of x over (j, i] below the diagonal, -inf above."""
    size = x.size(-1)
    x = x[..., None].expand(*x.size(), size)
    mask = torch.tril(torch.ones(size, size, device=x.device, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    seg = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(size, size, device=x.device, dtype=torch.bool), diagonal=0)
    return seg.masked_fill(~mask, -torch.inf)


def _chunks(x: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """[1, n, ...] -> [1, num_chunks, chunk, ...], zero-padded at the end."""
    shape = (0, 0) * (x.dim() - 2) + (0, pad)
    x = F.pad(x, shape, value=0)
    return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])


def chunk_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
               d: torch.Tensor, dt_bias: torch.Tensor, chunk_tokens: int, dt_limit: tuple[float, float],
               initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan of one sequence in chunks (the SSD form).

    x [n, heads, head_dim]; dt [n, heads] (before bias and softplus); a [heads] (negative);
    b, c [n, groups, d_state]; initial_state [heads, head_dim, d_state] or None (zeros).
    Returns (y [n, heads, head_dim] float32, final state [heads, head_dim, d_state] float32).
    """
    n, heads, _ = x.shape
    groups = b.shape[1]
    x, dt, b, c = x[None], dt[None], b[None], c[None]
    dt = F.softplus(dt + dt_bias.to(dt.dtype))
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    x = x.float()
    b = b.float().repeat_interleave(heads // groups, dim=2, output_size=heads)
    c = c.float().repeat_interleave(heads // groups, dim=2, output_size=heads)
    pad = (chunk_tokens - n % chunk_tokens) % chunk_tokens
    d_residual = d[..., None] * F.pad(x, (0, 0, 0, 0, 0, pad), value=0)
    x = x * dt[..., None].float()
    a = a.to(x.dtype) * dt.float()
    x, a, b, c = [_chunks(t, pad, chunk_tokens) for t in (x, a, b, c)]

    a = a.permute(0, 3, 1, 2)  # [1, heads, chunks, chunk]
    a_cumsum = torch.cumsum(a, dim=-1)
    # Diagonal blocks: attention-like within each chunk.
    decay = torch.exp(_segment_sum(a))
    g = torch.einsum("bclhn,bcshn->bclsh", c, b)
    m = g * decay.permute(0, 2, 3, 4, 1)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", m, x)
    # Each chunk's contribution to the state at its end.
    decay_states = torch.exp(a_cumsum[:, :, :, -1:] - a_cumsum)
    b_decay = b * decay_states.permute(0, -2, -1, 1)[..., None]
    states = torch.einsum("bclhn,bclhp->bchpn", b_decay, x)
    # Recurrence across chunks, from the initial state.
    prev = initial_state[None, None].to(dtype=states.dtype) if initial_state is not None \
        else torch.zeros_like(states[:, :1])
    states = torch.cat([prev, states], dim=1)
    decay_chunk = torch.exp(_segment_sum(F.pad(a_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)
    new_states = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # State -> output of each chunk.
    y_off = torch.einsum("bclhn,bchpn->bclhp", c, states) * torch.exp(a_cumsum).permute(0, 2, 3, 1)[..., None]
    y = (y_diag + y_off).contiguous().reshape(1, -1, heads, x.shape[-1]) + d_residual
    return y[0, :n], final_state[0]


def recurrent_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   c: torch.Tensor, d: torch.Tensor, dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence. state [B, heads, head_dim, d_state] float32; x [B, heads, head_dim];
    dt [B, heads]; b, c [B, groups, d_state]. Returns (y [B, heads, head_dim] in x's dtype, new state)."""
    batch, heads, head_dim = x.shape
    groups, d_state = b.shape[1], b.shape[-1]
    dt = dt[:, :, None].expand(-1, -1, head_dim)
    dt = F.softplus(dt + dt_bias[:, None].expand(-1, head_dim).to(dt.dtype))[..., None]
    a = a[:, None, None].expand(-1, head_dim, d_state)
    da = torch.exp(dt.float() * a.float())
    b = b.reshape(batch, groups, 1, d_state).expand(batch, groups, heads // groups, d_state).contiguous()
    db = dt * b.reshape(batch, heads, 1, d_state)
    new_state = state * da + db * x[..., None]
    c = c.reshape(batch, groups, 1, d_state).expand(batch, groups, heads // groups, d_state).contiguous()
    c = c.reshape(batch * heads, d_state, 1)
    y = torch.bmm(new_state.to(dtype=c.dtype).view(batch * heads, head_dim, d_state), c).view(batch, heads, head_dim)
    y = (y + x * d[:, None].expand(-1, head_dim)).to(y.dtype)
    return y.to(x.dtype), new_state


def gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    """RMSNorm(y * silu(gate)) over groups of ``group_size`` channels, in float32 (y [T, d_inner])."""
    in_dtype = y.dtype
    h = y.float() * F.silu(gate.float())
    t, width = h.shape
    hg = h.view(t, width // group_size, group_size)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hg.view(t, width).to(in_dtype)
