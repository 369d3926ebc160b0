"""Convolutions over mixed neurons (paper §3.3): survivors S and rejuvenated R.

Both modules read an input whose channels are split by two index buffers (``s_idx``, ``r_idx``) and write
``[S_out; R_out]``. They look like a Conv2d to the rest of the code (in/out_channels, kernel_size, groups=1).

- ``CRConv`` (NR-CR): S_out = W_SS * S, R_out = W_RR * R. The cross blocks do not exist at all.
- ``CAConv`` (NR-CA, eq. 9-10): S_out = A_S + 2σ(A_S)·(W_RS * R), R_out = A_R + 2σ(A_R)·(W_SR * S),
  with A_S = inner(S) (+ b_S) and A_R = W_RR * R + b_R: a conv bias belongs to its block's A term. ``inner``
  is W_SS as a plain conv (carrying b_S) the first time; after a second rejuvenation it is the previous
  CAConv itself (pruned), so the layer keeps computing exactly what it did. A layer whose outputs are all
  fixed (the last conv of a residual block) has no R_out: only the S_out line exists.
  The default ``impl="two"`` runs two convolutions (one per input group, each producing both outputs);
  ``impl="four"`` runs one per block, like the official code. Same FLOPs; `nr-study bench` times both.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init


def conv_like(template: nn.Conv2d, in_ch: int, out_ch: int, bias: bool = False) -> nn.Conv2d:
    """An uninitialised conv with the template's kernel, stride, padding, dilation and padding mode (callers
    fill it); bias-free unless asked, since a block's bias lives with its A term only."""
    return skip_init(nn.Conv2d, in_ch, out_ch, template.kernel_size, template.stride, template.padding,
                     template.dilation, bias=bias, padding_mode=template.padding_mode,
                     device=template.weight.device, dtype=template.weight.dtype)


class _SplitConv(nn.Module):
    def __init__(self, s_idx: torch.Tensor, r_idx: torch.Tensor, template: nn.Conv2d, s_out: int, r_out: int):
        super().__init__()
        self.register_buffer("s_idx", s_idx.long().clone())
        self.register_buffer("r_idx", r_idx.long().clone())
        self.in_channels = len(s_idx) + len(r_idx)
        self.out_channels = s_out + r_out
        self.s_out, self.r_out = s_out, r_out
        self.kernel_size, self.stride = template.kernel_size, template.stride
        self.padding, self.dilation = template.padding, template.dilation
        self.padding_mode = template.padding_mode
        # non-zero padding modes pad explicitly, then convolve unpadded (what nn.Conv2d does inside)
        self._pad = list(template._reversed_padding_repeated_twice) if self.padding_mode != "zeros" else None
        self.groups = 1
        # contiguous splits (one channel group) are cheap views; concatenated inputs need a gather
        s, r = self.s_idx.tolist(), self.r_idx.tolist()
        self._s_slice = (s[0], len(s)) if s and s == list(range(s[0], s[0] + len(s))) else None
        self._r_slice = (r[0], len(r)) if r and r == list(range(r[0], r[0] + len(r))) else None

    def split_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x.narrow(1, *self._s_slice) if self._s_slice else x.index_select(1, self.s_idx)
        xr = x.narrow(1, *self._r_slice) if self._r_slice else x.index_select(1, self.r_idx)
        return xs, xr

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self._pad is not None:
            return F.conv2d(F.pad(x, self._pad, mode=self.padding_mode), w, b, self.stride, 0, self.dilation)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)

    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - guard for code that expects a dense conv
        raise AttributeError(f"{type(self).__name__} has block weights; use to_dense() for a dense view")


class CRConv(_SplitConv):
    """NR-CR: two independent convolutions, S->S and R->R, each with its own bias when the layer has one."""

    def __init__(self, s_idx, r_idx, conv_s: nn.Conv2d, conv_r: nn.Conv2d):
        super().__init__(s_idx, r_idx, conv_s, conv_s.out_channels, conv_r.out_channels)
        self.conv_s, self.conv_r = conv_s, conv_r

    def forward(self, x):
        xs, xr = self.split_input(x)
        return torch.cat([self.conv_s(xs), self.conv_r(xr)], 1)

    def blocks(self):
        """(input index set, output slice) of each weight block, for the cost model."""
        return [(self.s_idx, slice(0, self.s_out)), (self.r_idx, slice(self.s_out, self.out_channels))]

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight: absent cross blocks are zeros (exact, the map is linear)."""
        w = self.conv_s.weight
        dense = w.new_zeros(self.out_channels, self.in_channels, *w.shape[2:])
        dense[: self.s_out, self.s_idx] = self.conv_s.weight.detach()
        dense[self.s_out:, self.r_idx] = self.conv_r.weight.detach()
        return dense

    def dense_bias(self) -> torch.Tensor | None:
        if self.conv_s.bias is None:
            return None
        return torch.cat([self.conv_s.bias.detach(), self.conv_r.bias.detach()])


class CAConv(_SplitConv):
    """NR-CA: cross attention between S and R (paper eq. 9-10).

    ``inner``: S_in -> S_out (Conv2d or an older CAConv; it carries b_S); ``w_sr``: S_in -> R_out (None when
    r_out == 0); ``w_r``: R_in -> [S_out; R_out] (None when R_in is empty); ``bias_r``: b_R (None when the
    layer has no bias or no R_out). With no R input A_R = b_R, as eq. 10 reads with W_RR * R = 0.
    """

    def __init__(self, s_idx, r_idx, inner: nn.Module, w_sr: nn.Conv2d | None, w_r: nn.Conv2d | None,
                 template: nn.Conv2d, s_out: int, r_out: int, impl: str = "two",
                 bias_r: torch.Tensor | None = None):
        super().__init__(s_idx, r_idx, template, s_out, r_out)
        self.inner, self.w_sr, self.w_r = inner, w_sr, w_r
        self.bias_r = nn.Parameter(bias_r.detach().clone()) if bias_r is not None and r_out else None
        self.impl = impl

    def forward(self, x):
        xs, xr = self.split_input(x)
        if self.impl == "four":
            return self.forward_four(xs, xr)
        s_out, r_out = self.s_out, self.r_out
        inner = self.inner
        if isinstance(inner, nn.Conv2d) and self.w_sr is not None:
            bias = None if inner.bias is None else torch.cat([inner.bias, inner.bias.new_zeros(r_out)])
            a_s, b_r = self._conv(xs, torch.cat([inner.weight, self.w_sr.weight], 0), bias).split([s_out, r_out], 1)
        else:
            a_s = inner(xs)
            b_r = self.w_sr(xs) if self.w_sr is not None else None
        if self.w_r is not None:
            b_s, a_r = self.w_r(xr).split([s_out, r_out], 1)
            s = _attend(a_s, b_s)
        else:
            s, a_r = a_s, None
        return torch.cat([s, self._r_out(a_r, b_r)], 1) if r_out else s

    def _r_out(self, a_r, b_r):
        """R_out = A_R + 2σ(A_R)·B_R with A_R = W_RR*R + b_R; a missing term is zero (2σ(0) = 1)."""
        if self.bias_r is not None:
            b = self.bias_r.view(1, -1, 1, 1)
            a_r = b if a_r is None else a_r + b
        if a_r is None:
            return b_r
        if b_r is None:
            return a_r
        return _attend(a_r, b_r)

    def forward_four(self, xs, xr):
        """Reference: one convolution per block, as the official implementation runs it."""
        s_out = self.s_out
        a_s = self.inner(xs)  # W_SS*S + b_S
        b_r = self._conv(xs, self.w_sr.weight) if self.w_sr is not None else None
        if self.w_r is not None:
            b_s = self._conv(xr, self.w_r.weight[:s_out])
            a_r = self._conv(xr, self.w_r.weight[s_out:]) if self.r_out else None
            s = _attend(a_s, b_s)
        else:
            s, a_r = a_s, None
        return torch.cat([s, self._r_out(a_r, b_r)], 1) if self.r_out else s

    def blocks(self):
        return [(torch.cat([self.s_idx, self.r_idx]), slice(0, self.out_channels))]  # every block exists


def _attend(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + 2·σ(a)·b in one fused kernel."""
    return torch.addcmul(a, torch.sigmoid(a), b, value=2.0)


SPLIT_CONVS = (CRConv, CAConv)
