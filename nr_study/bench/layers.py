"""Single-layer rows: NR-CA (two and four convolutions) and NR-CR against a plain conv of equal width, and how
NR-CA's cost grows as rejuvenations nest (each wraps the last CA layer)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from nr_study.bench.settings import GOALS, Sizes
from nr_study.bench.surgery import kill_channels
from nr_study.bench.timing import alternate, error_row, ratio_stats, row


def split_layers(c: int, device: torch.device) -> dict[str, nn.Module]:
    """A plain 3x3 conv c->c and its NR-CA (two / four convolutions) and NR-CR forms at half S / half R."""
    from nr_study.nr.schemes import CAConv, CRConv, conv_like

    plain = nn.Conv2d(c, c, 3, padding=1, bias=False)
    h = c // 2
    s_idx, r_idx = torch.arange(h), torch.arange(h, c)
    inner, w_sr, w_r = conv_like(plain, h, h), conv_like(plain, h, h), conv_like(plain, c - h, c)
    ca2 = CAConv(s_idx, r_idx, inner, w_sr, w_r, plain, h, c - h, impl="two")
    cr = CRConv(s_idx, r_idx, conv_like(plain, h, h), conv_like(plain, c - h, c - h))
    with torch.no_grad():  # whatever conv_like initialises (or not), time on well-scaled weights
        for conv in (plain, inner, w_sr, w_r, cr.conv_s, cr.conv_r):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    ca4 = CAConv(s_idx, r_idx, copy.deepcopy(inner), copy.deepcopy(w_sr), copy.deepcopy(w_r), plain, h, c - h,
                 impl="four")
    return {n: m.to(device) for n, m in (("plain", plain), ("ca_two", ca2), ("ca_four", ca4), ("cr", cr))}


def bench_layer(sz: Sizes, device: torch.device) -> list[dict]:
    """The split layers' fwd+bwd against the plain conv's, alternated: NR's cost per layer, free of the net."""
    c, hw, batch, warmup, reps = sz.layer
    cuda = device.type == "cuda"
    names = ("layer_ca_two/plain", "layer_ca_four/plain", "layer_cr/plain")
    try:
        torch.manual_seed(0)
        mods = split_layers(c, device)
        fmt = torch.channels_last if cuda else torch.contiguous_format
        if cuda:
            mods = {n: m.to(memory_format=torch.channels_last) for n, m in mods.items()}
        x = torch.randn(batch, c, hw, hw, device=device).contiguous(memory_format=fmt).requires_grad_(True)
        g = torch.randn(batch, c, hw, hw, device=device).contiguous(memory_format=fmt)
        g16 = g.to(torch.bfloat16)

        def fwd_bwd(mod):
            def fn():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    out = mod(x)
                out.backward(g if out.dtype == g.dtype else g16)
                x.grad = None
                mod.zero_grad(set_to_none=True)
            return fn

        t = alternate({n: fwd_bwd(m) for n, m in mods.items()}, reps, warmup, device)
        shape = f"{c}->{c} 3x3 at {hw}x{hw}, batch {batch}, half S / half R, fwd+bwd (input grad too), {device.type}"
        if cuda:
            shape += ", channels_last + bf16 autocast"
        rows = []
        for key, name in zip(("ca_two", "ca_four", "cr"), names):
            r, d = ratio_stats(t[key], t["plain"])
            rows.append(row(name, r, GOALS["layer"], "ratio", f"{d}; {shape}"))
        r, d = ratio_stats(t["ca_two"], t["ca_four"])
        faster = "two" if r < 1 else "four"
        rows.append(row("layer_ca_two/ca_four", r, None, "ratio",
                        f"{d}; < 1 means impl='two' (the default) is faster; here '{faster}' is faster"))
        return rows
    except Exception as exc:
        return [error_row(n, GOALS["layer"], "ratio", exc) for n in names] + [
            error_row("layer_ca_two/ca_four", None, "ratio", exc)]


def bench_nesting(sz: Sizes, device: torch.device) -> list[dict]:
    """Exactness makes NR-CA nest: the k-th rejuvenation wraps the previous CA layer as its S->S block."""
    from nr_study.models import create_model
    from nr_study.nr import build_graph, rejuvenate

    width, hw, batch, warmup, reps = sz.nest
    name = "ca_nest_3/1"
    try:
        torch.manual_seed(0)
        shape = (1, 3, hw, hw)
        model = create_model("vgg_small", num_classes=10, in_channels=3, width=width).to(device)
        nets, convs = {}, {}
        for k in range(1, 4):
            kill_channels(model, build_graph(model, shape), 0.3, seed=k)
            model, _ = rejuvenate(model, shape, 1.0, scheme="ca", inplace=False)
            if k in (1, 3):
                nets[k] = copy.deepcopy(model).train()
                convs[k] = sum(type(m) is nn.Conv2d for m in model.modules())
        x = torch.randn(batch, 3, hw, hw, device=device)

        def fwd_bwd(m):
            def fn():
                m(x).square().mean().backward()
                m.zero_grad(set_to_none=True)
            return fn

        t = alternate({str(k): fwd_bwd(m) for k, m in nets.items()}, reps, warmup, device)
        r, d = ratio_stats(t["3"], t["1"])
        return [row(name, r, None, "ratio", f"{d}; vgg_small width {width} at {hw}x{hw}, batch {batch}, fwd+bwd; "
                    f"conv modules {convs[1]} after 1 rejuvenation, {convs[3]} after 3; {device.type}")]
    except Exception as exc:
        return [error_row(name, None, "ratio", exc)]

