"""Architecture specs: the shapes of every weight layer as JSON, so a checkpoint taken after surgery can be
rebuilt from ``create_model(name)`` + ``apply_architecture(model, spec)`` + ``load_state_dict``."""
from __future__ import annotations

import torch
import torch.nn as nn

from nr_study.nr.schemes import CAConv, CRConv

_BN_TYPES = {"bn1d": nn.BatchNorm1d, "bn2d": nn.BatchNorm2d}


def module_spec(m: nn.Module) -> dict | None:
    if isinstance(m, CRConv):
        return {"type": "cr", "s_idx": m.s_idx.tolist(), "r_idx": m.r_idx.tolist(),
                "conv_s": module_spec(m.conv_s), "conv_r": module_spec(m.conv_r)}
    if isinstance(m, CAConv):
        return {"type": "ca", "s_idx": m.s_idx.tolist(), "r_idx": m.r_idx.tolist(), "s_out": m.s_out,
                "r_out": m.r_out, "impl": m.impl, "inner": module_spec(m.inner),
                "w_sr": module_spec(m.w_sr) if m.w_sr is not None else None,
                "w_r": module_spec(m.w_r) if m.w_r is not None else None, "bias_r": m.bias_r is not None}
    if isinstance(m, nn.Conv2d):
        return {"type": "conv2d", "in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size),
                "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
    if isinstance(m, nn.Linear):
        return {"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    for key, cls in _BN_TYPES.items():
        if type(m) is cls:
            return {"type": key, "n": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                    "track": m.track_running_stats}
    return None


def architecture_spec(model: nn.Module) -> dict:
    """JSON-able: every conv/linear/BN (split convs whole) by qualified name, plus the base cost C."""
    modules, skip = {}, ()
    for name, m in model.named_modules():
        if skip and name.startswith(skip):
            continue
        spec = module_spec(m)
        if spec is not None:
            modules[name] = spec
            if spec["type"] in ("cr", "ca"):
                skip = (name + ".",)
    return {"modules": modules, "base_cost": getattr(model, "nr_base_cost", None)}


def build_module(spec: dict) -> nn.Module:
    t = spec["type"]
    if t == "conv2d":
        padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
        m = nn.Conv2d(spec["in"], spec["out"], tuple(spec["kernel"]), tuple(spec["stride"]), padding,
                      tuple(spec["dilation"]), spec["groups"], spec["bias"], spec["padding_mode"])
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
        return m
    if t == "linear":
        m = nn.Linear(spec["in"], spec["out"], spec["bias"])
        nn.init.normal_(m.weight, 0, 0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
        return m
    if t in _BN_TYPES:
        return _BN_TYPES[t](spec["n"], eps=spec["eps"], momentum=spec["momentum"], affine=spec["affine"],
                            track_running_stats=spec["track"])
    s_idx, r_idx = torch.tensor(spec["s_idx"], dtype=torch.long), torch.tensor(spec["r_idx"], dtype=torch.long)
    if t == "cr":
        return CRConv(s_idx, r_idx, build_module(spec["conv_s"]), build_module(spec["conv_r"]))
    if t == "ca":
        inner = build_module(spec["inner"])
        template = inner
        while isinstance(template, CAConv):
            template = template.inner
        bias_r = torch.zeros(spec["r_out"]) if spec.get("bias_r") else None
        return CAConv(s_idx, r_idx, inner, build_module(spec["w_sr"]) if spec["w_sr"] else None,
                      build_module(spec["w_r"]) if spec["w_r"] else None, template, spec["s_out"], spec["r_out"],
                      impl=spec["impl"], bias_r=bias_r)
    raise ValueError(f"architecture spec: unknown module type {t!r}")


def apply_architecture(model: nn.Module, spec: dict) -> nn.Module:
    """Reshape ``model`` (fresh from create_model) to ``spec`` in place; changed layers get a fresh init."""
    current = architecture_spec(model)["modules"]
    device = next(model.parameters()).device
    for name, mspec in spec["modules"].items():
        if current.get(name) != mspec:
            try:
                model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(f"architecture spec: module '{name}' does not exist in this model") from exc
            model.set_submodule(name, build_module(mspec).to(device))
    if spec.get("base_cost"):
        model.nr_base_cost = dict(spec["base_cost"])
    return model
