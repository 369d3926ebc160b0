"""The method registry: a method's name -> its class and what the rest of the platform needs to know about it
(NR's defaults for its variants, which config sections it reads, whether it changes the model mid-run). A method
registers itself beside its implementation (`@register_method`, timm's shape); this module imports neither torch
nor the config, so the config can check `method:` against it.

Methods outside the package register the same way: a module named in $NR_STUDY_METHODS (comma-separated
import paths) is imported with the built-in ones, in the driver and in every sweep worker (the variable is
passed on to them).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

PLUGINS_ENV = "NR_STUDY_METHODS"
SECTIONS = ("nr", "fs", "slim", "redo", "cbp")  # the method-owned config sections (a method reads some, none or all of them)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type                       # Method subclass: cls(cfg, input_shape, tracking_uri)
    reads: tuple = ()               # of SECTIONS: what it reads (a pair trained as this method resets the others)
    changes_model: bool = False     # surgery or a prune mid-run: train.after_rejuvenation applies
    hook: bool = False              # runs NR's hook (nr_study.nr.NeuralRejuvenation)
    scheme: Optional[str] = None    # NR's defaults for the variant; nr.scheme / rescale / realloc override them
    rescale: Optional[bool] = None
    realloc: Optional[bool] = None


METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, **info) -> Callable[[type], type]:
    """Class decorator: `@register_method("NR-CR", reads=("nr",), changes_model=True, hook=True, scheme="cr")`.
    Stack it to register one class under several names (the NR variants)."""
    unknown = set(info.get("reads", ())) - set(SECTIONS)
    if unknown:
        raise ValueError(f"register_method({name!r}): reads {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")

    def deco(cls: type) -> type:
        if name in METHODS and METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].cls.__name__}, {cls.__name__})")
        METHODS[name] = MethodInfo(name=name, cls=cls, **info)
        return cls

    return deco


def load_plugins() -> None:
    """Import the modules $NR_STUDY_METHODS names: their @register_method calls add methods. One that cannot be
    imported is one line naming it, not a traceback from every command."""
    from nr_study.errors import ConfigError, one_line

    for mod in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(mod)
        except Exception as exc:
            raise ConfigError(f"${PLUGINS_ENV}: module {mod!r} cannot be imported ({type(exc).__name__}: "
                              f"{one_line(exc, 200)}); allowed: comma-separated importable modules that register "
                              f"methods") from None


def resolved_nr(cfg) -> dict:
    """The method's NR settings with nr.scheme / nr.rescale / nr.realloc overrides applied; `nr`: the method
    runs NR's hook."""
    info = METHODS[cfg.method]
    m = {"nr": info.hook, "scheme": info.scheme, "rescale": info.rescale, "realloc": info.realloc}
    m.update({k: getattr(cfg.nr, k) for k in ("scheme", "rescale", "realloc") if getattr(cfg.nr, k) is not None})
    return m
