"""Convolutions over mixed neurons (paper §3.3): survivors S and rejuvenated R.

Both modules read an input whose channels are split by two index buffers (``s_idx``, ``r_idx``) and write
``[S_out; R_out]``. They look like a Conv2d to the rest of the code (in/out_channels, kernel_size, groups=1).

- ``CRConv`` (NR-CR): S_out = W_SS * S, R_out = W_RR * R. The cross blocks do not exist at all.
- ``CAConv`` (NR-CA, eq. 9-10): S_out = A_S + 2σ(A_S)·(W_RS * R), R_out = A_R + 2σ(A_R)·(W_SR * S),
  with A_S = inner(S) and A_R = W_RR * R. ``inner`` is W_SS as a plain conv the first time; after a second
  rejuvenation it is the previous CAConv itself (pruned), so the layer keeps computing exactly what it did.
  The default ``impl="two"`` runs two convolutions (one per input group, each producing both outputs);
  ``impl="four"`` runs one per block, like the official code. Same FLOPs; `nr-study bench` times both.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init


def conv_like(template: nn.Conv2d, in_ch: int, out_ch: int) -> nn.Conv2d:
    """A bias-free, uninitialised conv with the template's kernel, stride, padding and dilation (callers fill it)."""
    return skip_init(nn.Conv2d, in_ch, out_ch, template.kernel_size, template.stride, template.padding,
                     template.dilation, bias=False, padding_mode=template.padding_mode,
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
        self.groups = 1
        self.bias = None
        # contiguous splits (one channel group) are cheap views; concatenated inputs need a gather
        s, r = self.s_idx.tolist(), self.r_idx.tolist()
        self._s_slice = (s[0], len(s)) if s and s == list(range(s[0], s[0] + len(s))) else None
        self._r_slice = (r[0], len(r)) if r and r == list(range(r[0], r[0] + len(r))) else None

    def split_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x.narrow(1, *self._s_slice) if self._s_slice else x.index_select(1, self.s_idx)
        xr = x.narrow(1, *self._r_slice) if self._r_slice else x.index_select(1, self.r_idx)
        return xs, xr

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise NotImplementedError("split convolutions support zero padding only")
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - guard for code that expects a dense conv
        raise AttributeError(f"{type(self).__name__} has block weights; use to_dense() for a dense view")


class CRConv(_SplitConv):
    """NR-CR: two independent convolutions, S->S and R->R."""

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


class CAConv(_SplitConv):
    """NR-CA: cross attention between S and R (paper eq. 9-10).

    ``inner``: S_in -> S_out (Conv2d or an older CAConv); ``w_sr``: S_in -> R_out (None when r_out == 0);
    ``w_r``: R_in -> [S_out; R_out] (None when R_in is empty).
    """

    def __init__(self, s_idx, r_idx, inner: nn.Module, w_sr: nn.Conv2d | None, w_r: nn.Conv2d | None,
                 template: nn.Conv2d, s_out: int, r_out: int, impl: str = "two"):
        super().__init__(s_idx, r_idx, template, s_out, r_out)
        self.inner, self.w_sr, self.w_r = inner, w_sr, w_r
        self.impl = impl

    def forward(self, x):
        xs, xr = self.split_input(x)
        if self.impl == "four":
            return self.forward_four(xs, xr)
        s_out, r_out = self.s_out, self.r_out
        if isinstance(self.inner, nn.Conv2d) and self.w_sr is not None:
            a_s, b_r = self._conv(xs, torch.cat([self.inner.weight, self.w_sr.weight], 0)).split([s_out, r_out], 1)
        else:
            a_s = self.inner(xs)
            b_r = self.w_sr(xs) if self.w_sr is not None else None
        if self.w_r is not None:
            b_s, a_r = self.w_r(xr).split([s_out, r_out], 1)
            s = _attend(a_s, b_s)
        else:
            s, a_r = a_s, None
        return torch.cat([s, self._r_out(a_r, b_r)], 1) if r_out else s

    @staticmethod
    def _r_out(a_r, b_r):
        if a_r is None:  # no R input: A_R = 0, so R_out = 0 + 2·σ(0)·B_R = B_R
            return b_r
        if b_r is None:
            return a_r
        return _attend(a_r, b_r)

    def forward_four(self, xs, xr):
        """Reference: one convolution per block, as the official implementation runs it."""
        s_out = self.s_out
        a_s = self.inner(xs)
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
