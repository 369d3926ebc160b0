"""Checkpoints: what a run writes each epoch (`<checkpoint_dir>/state.pt`), reads to resume, and the model payload
that rebuilds a model after surgery (also MLflow's `model/model.pt`).

A checkpoint (torch.load(weights_only=True)) holds the configuration (JSON), the model payload (model name,
kwargs, core architecture spec as JSON, weights), the optimizer, the method's state (`Method.state_dict()`), the
epoch, step, schedule offset, planned epochs and training FLOPs so far, the RNG states, the MLflow run id, the
metric history and the events' reports not yet logged, so a run resumed after a rejuvenation or a prune continues
bit for bit on CPU. It is written atomically (a crash or a full disk leaves the previous one), and a file that is
not ours, or one written for another method/architecture/dataset, is refused with one line before anything runs.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from nr_study.config import Config
from nr_study.errors import CheckpointError, CheckpointWriteError, one_line
from nr_study.files import read_torch, write_atomic

CKPT_NAME = "state.pt"
CKPT_FORMAT = 2  # 2: the method's state under "method_state"; format 1 (NR hook state, slim flag) is refused


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = np.random.get_state()
    py = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(st[1].astype(np.int64)),
        "numpy_pos": int(st[2]), "numpy_has_gauss": int(st[3]), "numpy_gauss": float(st[4]),
        "python_version": int(py[0]), "python_state": list(py[1]), "python_gauss": py[2],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(s["python_state"]), s["python_gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path: Path) -> None:
    """Write `obj` next to `path` and rename it over `path`: a crash or a full disk leaves the old file intact."""
    path = Path(path)

    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError:  # torch's zip writer hides the OS error ("unexpected pos 64 vs 0"): write once more
            tmp.unlink(missing_ok=True)  # through a Python file, whose OSError (ENOSPC) torch keeps as the context
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, write)
    except (OSError, RuntimeError) as exc:  # ENOSPC surfaces as RuntimeError from torch's zip writer
        os_exc = next((e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError) and e.strerror),
                      None)
        what = os_exc.strerror if os_exc is not None else one_line(exc, 200)
        kept = "the previous checkpoint is intact" if path.is_file() else "no earlier checkpoint"
        raise CheckpointWriteError(f"cannot write checkpoint {path} ({what}); {kept}") from exc


CKPT_KEYS = ("format", "model", "optimizer", "method_state", "epoch", "global_step", "history", "rng")


def load_checkpoint(checkpoint_dir) -> Optional[dict]:
    """The checkpoint in `checkpoint_dir` (None when there is none). A file that is not a readable nr_study
    training checkpoint raises CheckpointError (one line), never an unpickling traceback."""
    p = Path(checkpoint_dir) / CKPT_NAME
    if not p.is_file():
        return None
    ck = read_torch(p, "nr_study checkpoint", hint="delete it or use another --checkpoint-dir")
    if not isinstance(ck, dict) or not all(k in ck for k in CKPT_KEYS):
        what = (f"a {type(ck).__name__}" if not isinstance(ck, dict)
                else "a dict with keys " + ", ".join(sorted(map(str, ck))[:8]))
        raise CheckpointError(f"checkpoint {p}: a torch file but not an nr_study training checkpoint (it holds "
                              f"{what}); delete it or use another --checkpoint-dir")
    if ck.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"checkpoint {p}: unknown checkpoint format {ck.get('format')!r}; allowed: "
                              f"{CKPT_FORMAT}; delete it or use another --checkpoint-dir")
    return ck


def check_checkpoint_fits(ck: dict, cfg: Config, data, path) -> None:
    """Refuse to resume a checkpoint written for another method/architecture/dataset (one line)."""
    try:
        old = json.loads(ck.get("config_json") or "{}")
    except json.JSONDecodeError:
        old = {}
    meta = ck["model"] if isinstance(ck.get("model"), dict) else {}
    have = {
        "method": old.get("method"),
        "model.name": meta.get("model_name", (old.get("model") or {}).get("name")),
        "model.kwargs": json.loads(meta["model_kwargs_json"]) if meta.get("model_kwargs_json") else None,
        "data.name": (old.get("data") or {}).get("name"),
        "input shape": list(meta["input_shape"]) if meta.get("input_shape") is not None else None,
        "num_classes": meta.get("num_classes"),
    }
    want = {"method": cfg.method, "model.name": cfg.model.name, "model.kwargs": dict(cfg.model.kwargs),
            "data.name": cfg.data.name, "input shape": list(data.input_shape), "num_classes": int(data.num_classes)}
    for k, v in want.items():
        if have[k] is not None and have[k] != v:
            raise CheckpointError(f"checkpoint {path}: written for {k} {have[k]!r}, but this config has {v!r}; "
                                  f"resume with the config that wrote it or use another --checkpoint-dir")


def model_payload(model: nn.Module, meta: dict) -> dict:
    """Weights + everything create_model/apply_architecture need to rebuild them (weights_only-safe)."""
    from nr_study.nr import architecture_spec

    spec = architecture_spec(model)
    return dict(meta, arch_spec_json=json.dumps(spec) if spec is not None else "",
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})


def model_from_payload(payload: dict, load_weights: bool = True) -> nn.Module:
    """The model a payload describes: create_model, then the core's architecture spec (a rejuvenated or pruned
    model), then the weights."""
    from nr_study.models import create_model
    from nr_study.nr import apply_architecture

    model = create_model(payload["model_name"], num_classes=int(payload["num_classes"]),
                         in_channels=int(payload["in_channels"]), **json.loads(payload.get("model_kwargs_json") or "{}"))
    spec = payload.get("arch_spec_json") or ""
    if spec:
        model = apply_architecture(model, json.loads(spec)) or model
    if load_weights:
        model.load_state_dict(payload["state_dict"])
    return model
