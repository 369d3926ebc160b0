"""The model registry: names -> builders, plus ``tv:<name>`` for torchvision classification models.

Every builder is called as ``builder(num_classes=..., in_channels=..., **kw)`` and returns an ``nn.Module``.
User mistakes (an unknown name, an option a builder does not take, a bad class count) raise
:class:`nr_study.errors.ConfigError` with one line that says what is allowed.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

from torch import nn

from nr_study.errors import ConfigError

TV_PREFIX = "tv:"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register ``fn(num_classes=10, in_channels=3, **kw) -> nn.Module`` under ``name``."""
    if not isinstance(name, str) or not name or name.startswith(TV_PREFIX):
        raise ValueError(f"register_model: bad model name {name!r}")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"register_model: {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Registered architecture names (sorted). ``tv:<name>`` models are accepted on top of these."""
    return sorted(_REGISTRY)


def _suggest(name: str, candidates: list[str]) -> str:
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f"; did you mean '{lowered[close[0]]}'?" if close else ""


def _check_counts(num_classes, in_channels) -> None:
    for field, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model: {field} must be a positive integer, got {v!r}")


def _check_kwargs(name: str, fn: Callable, kw: dict) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("num_classes", "in_channels")]
    for k in kw:
        if k not in params:
            raise ConfigError(
                f"model: architecture '{name}' has no option '{k}'; allowed: "
                + (", ".join(allowed) if allowed else "none")
            )


def tv_classification_models() -> list[str]:
    """Names of torchvision's classification models (what ``tv:<name>`` accepts)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first ``nn.Conv2d`` (in module order) for one reading ``in_channels`` channels.

    Everything else (kernel, stride, padding, dilation, bias, padding mode, dtype/device) is kept; the new
    weight is Kaiming-normal initialised (fan_out, relu) and a bias, if any, zeroed.
    """
    for qualname, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            break
    else:
        raise ConfigError(f"model: in_channels={in_channels} but the model has no nn.Conv2d to adapt")
    if mod.in_channels == in_channels:
        return model
    groups = mod.groups
    if groups != 1:
        if groups == mod.in_channels and mod.out_channels % in_channels == 0:
            groups = in_channels  # depthwise first conv stays depthwise
        else:
            raise ConfigError(
                f"model: cannot adapt the first conv '{qualname}' (groups={mod.groups}) to in_channels={in_channels}"
            )
    new = nn.Conv2d(
        in_channels,
        mod.out_channels,
        kernel_size=mod.kernel_size,
        stride=mod.stride,
        padding=mod.padding,
        dilation=mod.dilation,
        groups=groups,
        bias=mod.bias is not None,
        padding_mode=mod.padding_mode,
        device=mod.weight.device,
        dtype=mod.weight.dtype,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_name, _, attr = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


def _create_tv(name: str, full: str, num_classes: int, in_channels: int, kw: dict) -> nn.Module:
    import torchvision.models as tvm

    allowed = tv_classification_models()
    if name not in allowed:
        what = (
            "is a torchvision model but not a classification model"
            if name in tvm.list_models()
            else "is not a torchvision classification model"
        )
        sugg = _suggest(name, allowed)
        sugg = sugg.replace("mean '", f"mean '{TV_PREFIX}") if sugg else ""
        raise ConfigError(
            f"model: '{full}' {what} (see torchvision.models.list_models(module=torchvision.models)){sugg}"
        )
    if "weights" in kw and kw["weights"] is not None:
        raise ConfigError(f"model: '{full}' is always built with weights=None (no downloads)")
    kw = {k: v for k, v in kw.items() if k != "weights"}
    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **kw)
    except TypeError as e:  # an option the constructor does not take
        raise ConfigError(f"model: '{full}': {e}") from None
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """Build a model by registered name or ``tv:<torchvision classification model>`` (never downloads)."""
    _check_counts(num_classes, in_channels)
    if not isinstance(name, str):
        raise ConfigError(f"model: architecture must be a string, got {name!r}")
    if name.startswith(TV_PREFIX):
        return _create_tv(name[len(TV_PREFIX):], name, num_classes, in_channels, kw)
    fn = _REGISTRY.get(name)
    if fn is None:
        names = list_models()
        raise ConfigError(
            f"model: unknown architecture '{name}'; allowed: {', '.join(names)} "
            f"or {TV_PREFIX}<torchvision classification model>{_suggest(name, names)}"
        )
    _check_kwargs(name, fn, kw)
    return fn(num_classes=num_classes, in_channels=in_channels, **kw)
