"""NR-FS (the paper's ablation): the architecture an NR run found, trained from scratch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from nr_study.errors import ConfigError
from nr_study.files import read_json, read_torch
from nr_study.methods.base import Method
from nr_study.methods.registry import register_method

if TYPE_CHECKING:
    from nr_study.config import Config


def fs_spec(cfg: Config, tracking_uri: Optional[str]) -> tuple[dict, Optional[str]]:
    """NR-FS: the architecture spec found by an earlier run (MLflow run id or exported file), and its model."""
    if cfg.fs.run_id:
        import tempfile

        from nr_study.tracking import download_artifact

        with tempfile.TemporaryDirectory(prefix="nr_study_art_") as tmp:
            path = download_artifact(cfg.fs.run_id, "model/model.pt", cfg.fs.tracking_uri or tracking_uri, tmp)
            payload = read_torch(path, "nr_study model file")
        spec = payload.get("arch_spec_json") if isinstance(payload, dict) else None
        if not spec:
            raise ConfigError(f"fs.run_id: run {cfg.fs.run_id!r} has no architecture spec (was it a BL run?)")
        return json.loads(spec), payload.get("model_name")
    path = Path(cfg.fs.architecture_file)
    if not path.is_file():
        raise ConfigError(f"fs.architecture_file: {str(path)!r} not found; expected final_widths.json or model.pt")
    if path.suffix in (".pt", ".pth"):
        payload = read_torch(path, "nr_study model file")
        if not (isinstance(payload, dict) and payload.get("arch_spec_json")):
            raise ConfigError(f"fs.architecture_file: {str(path)!r} holds no architecture spec; allowed: the "
                              f"model.pt of an NR run (or its final_widths.json)")
        return json.loads(payload["arch_spec_json"]), payload.get("model_name")
    obj = read_json(path, "final_widths.json architecture file")
    if isinstance(obj, dict) and "architecture" in obj:  # final_widths.json
        return obj["architecture"], obj.get("model")
    return obj, None


@register_method("NR-FS", reads=("fs",))
class FromScratch(Method):
    """NR-FS: the architecture an NR run found, trained from scratch (re-initialised weights)."""

    @classmethod
    def check_config(cls, cfg):
        if cfg.fs.run_id or cfg.fs.architecture_file:
            return []
        return ["fs.run_id: null is not allowed for method NR-FS; set fs.run_id or fs.architecture_file"]

    def on_fit_start(self, model):
        if self.resumed:
            return model
        from nr_study.models.layers import init_weights
        from nr_study.nr import apply_architecture

        spec, src = fs_spec(self.cfg, self.tracking_uri)
        if src and src != self.cfg.model.name:
            raise ConfigError(f"model.name: {self.cfg.model.name!r} differs from the NR-FS source model {src!r}")
        model = apply_architecture(model, spec) or model
        init_weights(model)
        return model
