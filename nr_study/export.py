"""`nr-study export RUN_ID DIR`: a run's final model into a folder (model.pt + model.json), loadable anywhere with
`nr_study.load_model(DIR)` — weights_only loading, the architecture spec rebuilds the module."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from nr_study.errors import ConfigError
from nr_study.names import MODEL_FILE


def export_model(ref: str, out_dir, tracking_uri=None) -> Path:
    """Copy the model of `ref` (a run id or models:/<id>) into `out_dir`; checks it loads. Returns the folder."""
    from nr_study.tracking import download_model, load_model

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {out} exists and is not a folder")
    with tempfile.TemporaryDirectory() as td:
        src = Path(download_model(ref, tracking_uri, dst=td))
        load_model(str(src))  # refuse to write a folder that would not load
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    return out


def cli_main(argv) -> int:
    from nr_study.tracking import quiet_client_logs

    quiet_client_logs()
    from nr_study.cli_parser import CommandParser

    ap = CommandParser(prog="nr-study export", description="Write a run's final model to a folder.")
    ap.add_argument("run", help="MLflow run id, or models:/<model id>")
    ap.add_argument("dir", help="folder to write model.pt (and model.json) into")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                    "sqlite:///<runs>/mlflow.db)")
    args = ap.parse_args(list(argv))
    out = export_model(args.run, args.dir, args.tracking_uri)
    print(f"{out / MODEL_FILE}: load it with nr_study.load_model({str(out)!r})")
    return 0
