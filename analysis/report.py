"""Write Results to a folder: every figure as PNG beside its numbers (CSV or JSON), analysis.json, and one report
page (self-contained HTML, images embedded) plus a Markdown summary."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import SECTIONS, Output, Results

DPI = 130


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, pd.DataFrame):
        return _jsonable(obj.to_dict(orient="records"))
    return obj


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented UTF-8 JSON: numpy numbers as numbers, NaN / inf as null, DataFrames as records."""
    path.write_text(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    return buf.getvalue()


def write_outputs(results: Results, out: Path) -> dict[str, list[str]]:
    """Save every output into ``out``; returns {output name: [file names]}."""
    files: dict[str, list[str]] = {}
    for o in results.outputs:
        names = []
        if isinstance(o.data, pd.DataFrame):
            o.data.to_csv(out / f"{o.name}.csv", index=False)
            names.append(f"{o.name}.csv")
        else:
            write_json(out / f"{o.name}.json", o.data)
            names.append(f"{o.name}.json")
        if o.figure is not None:
            (out / f"{o.name}.png").write_bytes(_png_bytes(o.figure))
            names.insert(0, f"{o.name}.png")
        files[o.name] = names
    # the analysis run's MLflow metrics (NaN is not a metric), so `ptray analyse --log-only` can log them later
    metrics = {k: v for k, v in results.metrics.items() if v is not None and math.isfinite(v)}
    write_json(out / "analysis.json", {**results.summary, "files": files, "mlflow_metrics": metrics})
    return files


def _table_html(df: pd.DataFrame, max_rows: int = 60) -> str:
    shown = df.head(max_rows)
    body = shown.to_html(index=False, na_rep="n/a", border=0, classes="t",
                         float_format=lambda v: f"{v:.4g}", escape=True)
    more = f"<p class='note'>{len(df) - max_rows} more rows in the CSV.</p>" if len(df) > max_rows else ""
    return f"<div class='scroll'>{body}</div>{more}"


def _nearest_html(table: pd.DataFrame) -> str:
    """The nearest tokens as HTML text (the browser shapes every script properly), one line per row and seed."""
    if table.empty:
        return ""
    k = int(table["rank"].max()) + 1
    rows = []
    for (seed, row), g in table.sort_values(["seed", "row", "rank"]).groupby(["seed", "row"], sort=False):
        cells = []
        for r in g.itertuples():
            cls = " class='init'" if r.in_init_text else ""
            script = html.escape(str(getattr(r, "script", "")))
            other = f" <small class='script'>{script}</small>" if getattr(r, "other_script", False) else ""
            cells.append(f"<td{cls} title='id {r.token_id}, {html.escape(r.token_escaped)}, {script}'>"
                         f"{html.escape(r.token_visible)} <small>{r.cosine:.2f}</small>{other}</td>")
        cells += ["<td></td>"] * (k - len(cells))
        rows.append(f"<tr><td>{seed}</td><td>{row}</td><td>{html.escape(str(g.iloc[0].init_token))}</td>"
                    + "".join(cells) + "</tr>")
    head = "<tr><th>seed</th><th>row</th><th>init token</th>" + "".join(
        f"<th>#{i + 1}</th>" for i in range(k)) + "</tr>"
    return ("<details><summary>tokens as text</summary><div class='scroll'><table class='t tokens'>" + head
            + "".join(rows) + "</table></div></details>")


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI','Noto Sans',sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
img{max-width:100%;border:1px solid #eee}img.wide{max-width:none}.scroll{overflow-x:auto}
table.t{border-collapse:collapse;font-size:.82em;margin:.5em 0}
table.t td,table.t th{border:1px solid #ddd;padding:2px 6px;text-align:right}table.t th{background:#f4f4f4}
table.tokens td{text-align:left}td.init{color:#c0392b;font-weight:bold}small{color:#888}small.script{color:#1f5fbf}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 3px}
"""


def _meta_rows(meta: dict) -> str:
    keys = ["experiment", "study", "model", "num_prompts", "tasks", "seeds", "num_tokens", "hidden_size",
            "vocab_size", "effective_prompt", "distance_method", "distance_definition", "top_k", "n_boot",
            "num_transfer_runs", "num_baseline_runs", "nearest_seconds", "faithfulness_seconds", "ffn_neurons"]
    rows = "".join(f"<tr><th>{k}</th><td style='text-align:left'>{html.escape(json.dumps(_jsonable(meta[k])))}"
                   f"</td></tr>" for k in keys if k in meta)
    return f"<table class='t'>{rows}</table>"


INTRO = (
    "This page recomputes the paper's figures and tables from the runs tracked in MLflow and puts the "
    "measurements the paper missed beside them. \"Raw\" numbers use the prompt rows as stored (the paper's "
    "method). A model normalises its input rows before its first attention reads them (BLOOM: a LayerNorm on "
    "every input embedding, so a prompt row's scale and mean never reach the transformer): \"effective\" numbers "
    "use the rows after that normalisation (effective_prompt below names it), i.e. what the model sees; n/a "
    "where the model's family defines none. Every figure's numbers are in the CSV or JSON file of the same name; "
    "every caption says what its statistics are (standard deviations: sample, ddof=1, except Table 1's "
    "population variance, ddof=0, as in the paper; which bootstrap interval a figure shows; which p-value "
    "accounts for the dependence between task pairs)."
)


def write_html(results: Results, files: dict[str, list[str]], out: Path) -> Path:
    """Write the self-contained ``report.html`` (figures embedded as PNG data URIs) into ``out``; returns its
    path. ``files``: {output name: its file names}, from ``write_outputs``."""
    meta = results.meta
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Prompt analysis: "
             f"{html.escape(meta['experiment'])}</title><style>{CSS}</style></head><body>",
             f"<h1>Prompt-tuning analysis: experiment <code>{html.escape(meta['experiment'])}</code></h1>"]
    if meta.get("coverage_headline"):  # before anything else: whether the numbers below cover the whole plan
        parts.append(f"<p><strong>{html.escape(meta['coverage_headline'])}.</strong></p>")
    parts += _sections_html(results, files, out, ("coverage",))
    parts += [f"<p>{html.escape(INTRO)}</p>", _meta_rows(meta)]
    if meta.get("notes"):
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in meta["notes"]) + "</ul>")
    parts += _sections_html(results, files, out, tuple(k for k in SECTIONS if k != "coverage"))
    parts.append("<h2>Files</h2><ul>" + "".join(
        f"<li>{html.escape(o)}: {', '.join(html.escape(f) for f in fs)}</li>" for o, fs in files.items())
        + "<li>analysis.json: every summary number</li></ul></body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _sections_html(results: Results, files: dict[str, list[str]], out: Path, keys: tuple[str, ...]) -> list[str]:
    """The HTML of the sections ``keys`` (keys of ``SECTIONS``, in that order) that have outputs."""
    parts = []
    for key in keys:
        outs = [o for o in results.outputs if o.section == key]
        if not outs:
            continue
        parts.append(f"<h2>{html.escape(SECTIONS[key])}</h2>")
        for o in outs:
            parts.append(_output_html(o, files.get(o.name, []), out))
    return parts


def _output_html(o: Output, files: list[str], out: Path) -> str:
    part = [f"<h3>{html.escape(o.title)}</h3>"]
    if o.text:
        part.append(f"<p>{html.escape(o.text)}</p>")
    if o.figure is not None:
        png = (out / f"{o.name}.png").read_bytes()  # embedded byte for byte as saved
        img = f"alt='{html.escape(o.title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'"
        if o.section == "nearest":  # token grids stay at full size (readable), scrolled sideways
            part.append(f"<div class='scroll'><img class='wide' {img}></div>")
        else:
            part.append(f"<img {img}>")
    if o.name.startswith("nearest_") and isinstance(o.data, pd.DataFrame) and "token_visible" in o.data:
        part.append(_nearest_html(o.data))
    elif o.show_table and isinstance(o.data, pd.DataFrame) and not o.data.empty:
        part.append(_table_html(o.data))
    part.append(f"<p class='note'>Files: {', '.join(html.escape(f) for f in files)}</p>")
    return "\n".join(part)


def _md_table(df: pd.DataFrame, digits: int = 4) -> str:
    def cell(v):
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.{digits}g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def write_markdown(results: Results, out: Path) -> Path:
    """Write ``report.md``, the report's tables without figures, into ``out``; returns its path."""
    meta, s = results.meta, results.summary
    per_task = ", ".join(f"{t}: {len(v)} seeds, {meta['num_tokens'][t]} tokens" for t, v in meta["seeds"].items())
    lines = [f"# Prompt-tuning analysis: `{meta['experiment']}`", "",
             f"Study `{meta['study']}`, model `{meta['model']}`, {meta['num_prompts']} prompts "
             f"({per_task})."
             f" Effective prompt: {meta.get('effective_prompt') or 'n/a (not defined for this model)'}. "
             f"Distances between prompts "
             f"of different lengths: {meta.get('distance_definition', meta['distance_method'])}. "
             "The full report with every figure is `report.html`; every number is in `analysis.json` and the CSVs.",
             ""]
    by_name = {o.name: o for o in results.outputs}
    if "coverage" in by_name:  # first: whether the numbers below cover the whole plan
        lines[2:2] = [f"**{meta['coverage_headline']}.**", "", f"## {SECTIONS['coverage']}", "",
                      _md_table(by_name["coverage"].data), ""]
    if meta.get("notes"):
        lines += ["**Notes:**", *[f"- {n}" for n in meta["notes"]], ""]
    if "claims" in by_name:
        lines += [f"## {SECTIONS['claims']}", "", by_name["claims"].text, "", _md_table(by_name["claims"].data), ""]
    for name, heading, columns in (
            ("accuracy_floors", "Accuracy floors: the majority class, no prompt, the init text", None),
            ("table1_norms", "Table 1: norms per task",
             ["task", "num_tokens", "num_seeds", "frobenius_raw_mean", "frobenius_raw_var_ddof0",
              "rms_row_norm_raw_mean", "frobenius_effective_mean", "rms_row_norm_effective_mean", "drift_raw_mean"]),
            ("nearest_summary", "Nearest tokens", None),
            ("nearest_scripts", "Nearest tokens in other scripts, init -> best epoch",
             ["space", "task", "seed", "init_scripts", "best_epoch", "top1_is_init_token_init",
              "top1_is_init_token_best", "rows_other_script_init", "rows_other_script_best", "other_scripts_best"]),
            ("spread_vs_outcome", "Do harder tasks vary more? Prompt spread against outcome spread", None),
            ("spread_correlations", "Prompt spread against outcome spread: Spearman over tasks, exact p", None),
            ("within_task", "Within-task distances", None),
            ("task_clusters", "Do a task's prompts cluster?", None),
            ("correlation_stats", "Distance vs transfer: Mantel test over task labels (dependence-aware)",
             ["predictor", "gain", "n_pairs", "spearman_rho", "spearman_p_mantel", "mantel_permutations",
              "spearman_p_naive", "pearson_r", "pearson_p_mantel", "pearson_p_naive"]),
            ("predictors", "Transferability predictors (Spearman with transfer gain, Mantel p)",
             ["predictor", "gain", "expected_sign", "n_pairs", "spearman_rho", "spearman_p_mantel",
              "spearman_p_naive", "pearson_r"])):
        o = by_name.get(name)
        if o is None or not isinstance(o.data, pd.DataFrame) or o.data.empty:
            continue
        df = o.data[columns] if columns else o.data
        lines += [f"## {heading}", ""]
        if name in ("accuracy_floors", "table1_norms", "correlation_stats", "nearest_scripts", "spread_vs_outcome",
                    "spread_correlations", "task_clusters"):  # their captions define the columns
            lines += [o.text, ""]
        lines += [_md_table(df), ""]
    if "transfer" in by_name:
        t = by_name["transfer"].data
        lines += ["## Transfer (accuracy change over no prompt)", "", by_name["transfer"].text, "",
                  _md_table(t[["source", "target", "metric", "n_seeds", "n_examples", "baseline", "delta_mean",
                               "delta_sd_ddof1", "ci95_seeds_examples_low", "ci95_seeds_examples_high",
                               "ci95_examples_low", "ci95_examples_high"]]), ""]
    for name, heading in (("transfer_asymmetry", "Is transfer symmetric?"),
                          ("transfer_own_task", "Is a prompt's gain largest on its own task?")):
        o = by_name.get(name)
        if o is not None and not o.data.empty:
            lines += [f"## {heading}", "", o.text, "", _md_table(o.data), ""]
    if "faithfulness" in by_name:
        lines += ["## Faithfulness (mean over seeds)", "", _md_table(pd.DataFrame(s["faithfulness"])), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_all(results: Results, out: Path) -> dict[str, list[str]]:
    """Everything into ``out`` (which must exist)."""
    files = write_outputs(results, out)
    write_html(results, files, out)
    write_markdown(results, out)
    return files
