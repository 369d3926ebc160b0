"""The index page of an output folder: `report.md` and a static `index.html` linking every table and plot.

Both `nr-study tables` and `nr-study plots` call `write_index(out)` after writing their files, so the index
always covers what the folder holds: tables listed in tables/manifest.json (else any tables/*.md), plots in
plots/manifest.json (else any plots/*.png), each with its notes (runs skipped and why).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}li{margin:.15em 0}.notes{color:#555;font-size:13px}"""


def _manifest(folder: Path, pattern: str) -> dict[str, dict[str, Any]]:
    mf = folder / "manifest.json"
    if mf.is_file():
        try:
            return json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        files = {q.suffix.lstrip("."): q.name for q in folder.glob(p.stem + ".*")}
        out[p.stem] = {"title": p.stem, "files": files, "notes": []}
    return out


def collect(out_dir: str | Path) -> tuple[dict, dict]:
    out = Path(out_dir)
    tables = _manifest(out / "tables", "*.md")
    plots = _manifest(out / "plots", "*.png")
    # only what is really there
    for group, sub in ((tables, "tables"), (plots, "plots")):
        for name in list(group):
            files = {k: v for k, v in group[name].get("files", {}).items() if (out / sub / v).is_file()}
            group[name]["files"] = files
            if not files and not group[name].get("notes"):
                del group[name]
    return tables, plots


def write_index(out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables, plots = collect(out)

    md = ["# nr_study report", "",
          "Paper tables rebuilt from MLflow runs (paper | reproduced mean ± std (n) | Δ) and plots. "
          "Regenerate with `nr-study tables` and `nr-study plots`.", ""]
    md += ["## Tables", ""] if tables else ["## Tables", "", "_none yet: run `nr-study tables`_", ""]
    for name, t in tables.items():
        links = " · ".join(f"[{ext}](tables/{fn})" for ext, fn in sorted(t["files"].items()))
        md.append(f"- **{t.get('title', name)}** ({t.get('n_runs', '?')} run(s)): {links}")
        md += [f"  - note: {n}" for n in t.get("notes", [])]
    md += ["", "## Plots", ""] if plots else ["", "## Plots", "", "_none yet: run `nr-study plots`_", ""]
    for name, pl in plots.items():
        links = " · ".join(f"[{ext}](plots/{fn})" for ext, fn in sorted(pl["files"].items())) or "_not drawn_"
        md.append(f"### {pl.get('title', name)}")
        md.append("")
        md.append(f"{links}")
        md.append("")
        if "png" in pl["files"]:
            md += [f"![{pl.get('title', name)}](plots/{pl['files']['png']})", ""]
        md += [f"- note: {n}" for n in pl.get("notes", [])]
        if pl.get("notes"):
            md.append("")
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    e = html.escape
    h = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>nr_study report</title>",
         f"<style>{CSS}</style></head><body>", "<h1>nr_study report</h1>",
         "<p>Paper tables rebuilt from MLflow runs (paper | reproduced mean ± std (n) | Δ) and plots. "
         "See also <a href='report.md'>report.md</a>.</p>", "<h2>Tables</h2>"]
    if not tables:
        h.append("<p><em>none yet: run <code>nr-study tables</code></em></p>")
    h.append("<ul>")
    for name, t in tables.items():
        links = " · ".join(f"<a href='tables/{e(fn)}'>{e(ext)}</a>" for ext, fn in sorted(t["files"].items()))
        h.append(f"<li><a href='#{e(name)}'>{e(t.get('title', name))}</a> ({t.get('n_runs', '?')} run(s)): {links}</li>")
    h.append("</ul>")
    for name, t in tables.items():
        frag = out / "tables" / t["files"].get("html", "")
        if "html" in t["files"] and frag.is_file():
            h.append(frag.read_text(encoding="utf-8"))
    h.append("<h2>Plots</h2>")
    if not plots:
        h.append("<p><em>none yet: run <code>nr-study plots</code></em></p>")
    for name, pl in plots.items():
        links = " · ".join(f"<a href='plots/{e(fn)}'>{e(ext)}</a>" for ext, fn in sorted(pl["files"].items())) or "<em>not drawn</em>"
        h.append(f"<h3 id='{e(name)}'>{e(pl.get('title', name))}</h3><p>{links}</p>")
        if "png" in pl["files"]:
            h.append(f"<img src='plots/{e(pl['files']['png'])}' alt='{e(pl.get('title', name))}'>")
        if pl.get("notes"):
            h.append("<ul class='notes'>" + "".join(f"<li>{e(n)}</li>" for n in pl["notes"]) + "</ul>")
    h.append("</body></html>")
    html_path = out / "index.html"
    html_path.write_text("\n".join(h) + "\n", encoding="utf-8")
    return md_path, html_path
