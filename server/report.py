"""``report.html``: a run folder as a page people read. Self-contained (plots
embedded as PNG data, no script or style from the network), rewritten after
every round and at the end: the run's settings, Dice and training loss per
round per site, time and bytes per round, failures, the privacy budget
spent, and the final per-site table (with several structures, its headline is
the mean over structures, and a table per structure follows). A finished run's
page opens with its outcome (failed and why, stopped and why, or finished),
its date, the fedseg version and the final model's SHA-256 (or that none was
written); scores carry their units (HD95 in mm)."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from common.wire import SCORES, structure_key

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:1em} .plots img{max-width:100%;border:1px solid #eee}
.bad{color:#a00} .note{color:#666;font-size:.9em}
"""

# Marks, once the page has loaded, how many plots decoded (a browser test reads it).
CHECK = """
window.addEventListener('load',function(){var i=document.images,ok=0;
for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0){ok++;}}
document.body.setAttribute('data-plots-ok',ok+'/'+i.length);});
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = []
    for key, mean_key, ylabel, limits in (("dice", "dice_mean", "Dice (test cases)", (0, 1)),
                                          ("train_loss_sites", "train_loss", "training loss",
                                           None)):
        fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=100)
        sites = sorted({s for r in history for s in r.get(key, {})})
        for site in sites:
            pts = [(r["round"], r[key][site]) for r in history
                   if r.get(key, {}).get(site) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=site)
        pts = [(r["round"], r[mean_key]) for r in history if r.get(mean_key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "k--", label="all sites")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="round", ylabel=ylabel, **({"ylim": limits} if limits else {}))
        ax.grid(alpha=0.3)
        if sites:
            ax.legend(fontsize="small")
        fig.tight_layout()
        out.append((ylabel, _png(fig)))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=100)
    rounds = [r["round"] for r in history]
    ax.bar(rounds, [r.get("seconds", 0) for r in history], color="#4c78a8")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="seconds")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out.append(("seconds per round", _png(fig)))
    plt.close(fig)
    return out


# How the page names the scores (with their units) and the privacy rows
SCORE_NAMES = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (mm)", "sensitivity": "sensitivity",
               "specificity": "specificity"}
PRIVACY_NAMES = {
    "secure_aggregation": "secure aggregation (SecAgg+)",
    "dp": "differential privacy",
    "noise_multiplier": "noise multiplier (σ, times the clipping norm)",
    "clipping_norm": "clipping norm (L2, of each update)",
    "delta": "δ (DP failure probability)",
    "epsilon": "ε spent",
    "max_epsilon": "ε budget (the run stops before it)",
    "dp_releases": "noisy model releases",
    "accountant": "accountant",
}


def _score_headers() -> str:
    return "".join(f"<th>{_e(SCORE_NAMES.get(k, k))}</th>" for k in SCORES)


def _outcome(summary: dict[str, Any], planned: Any) -> str:
    """The first thing the page says of a finished run: failed and why, stopped
    and why, or finished; then when, with which fedseg, and which model."""
    done = f"{summary['rounds_completed']} of {planned} rounds"
    problems = summary.get("problems") or []
    if problems:
        head = (f"<p id='outcome' class='bad'><strong>failed</strong> after {done}: "
                + "; ".join(_e(p) for p in problems) + "</p>")
    elif summary.get("stopped"):
        head = (f"<p id='outcome' class='bad'><strong>stopped</strong> after {done}: "
                f"{_e(summary['stopped'])}</p>")
    else:
        head = f"<p id='outcome'><strong>finished</strong>: {done}</p>"
    model = summary.get("final_model")
    shown = (f"model {_e(model['file'])}, SHA-256 <code>{_e(model['sha256'])}</code>"
             if model else "<span class='bad'>no final model written</span>")
    return (head + f"<p id='meta' class='note'>finished {_e(summary.get('finished_at', '–'))}"
            f" · fedseg {_e(summary.get('fedseg_version', '–'))} · {shown}</p>")


def _per_structure(structures: list[str], sites: dict[str, dict[str, Any]],
                   overall: dict[str, Any]) -> str:
    """The final scores of each structure, per site and across sites."""
    rows = []
    for structure in structures:
        keys = [structure_key(k, structure) for k in SCORES]
        rows += [f"<tr><td class='l'>{_e(structure)}</td><td class='l'>{_e(s)}</td>"
                 + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in keys) + "</tr>"
                 for s, m in sorted(sites.items())]
        rows.append(f"<tr><th class='l'>{_e(structure)}</th><th class='l'>all "
                    "(case-weighted)</th>"
                    + "".join(f"<th>{_fmt(overall.get(k))}</th>" for k in keys) + "</tr>")
    return ("<h2>Final model, per structure</h2><table id='structures'><tr>"
            "<th class='l'>structure</th><th class='l'>site</th>"
            + _score_headers() + "</tr>" + "".join(rows) + "</table>")


def _harmonisation(fixed: dict[str, Any] | None) -> str:
    """What the run fixed from its sites' fingerprints (docs/data.md)."""
    if not fixed:
        return ("<h2>Harmonisation</h2><p id='harmonisation'>off: every case as read, "
                "z-scored on its own</p>")
    spacing = fixed.get("spacing")
    rows = [("target spacing", " x ".join(f"{v:g}" for v in spacing) + " mm" if spacing
             else "each case's own grid")]
    for modality, scheme in sorted((fixed.get("intensity") or {}).items()):
        if scheme.get("scheme") == "ct":
            low, high = scheme["clip"]
            text = (f"clipped to {low:.1f} .. {high:.1f}, then (x - {scheme['mean']:.1f}) / "
                    f"{scheme['std']:.1f}")
        else:
            text = "z-score per case"
        rows.append((f"{modality} intensities", text))
    rows.append(("from the fingerprints of", f"{fixed.get('sites', 0)} sites"))
    return ("<h2>Harmonisation</h2><table id='harmonisation'>" + "".join(
        f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>" for k, v in rows)
        + "</table>")


def render(name: str, config: dict[str, Any], history: list[dict[str, Any]],
           summary: dict[str, Any] | None) -> str:
    """The page, as text."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>fedseg run {_e(name)}</title><style>{STYLE}</style></head><body>",
             f"<h1>fedseg run {_e(name)}</h1>"]
    planned = config.get("num-rounds")
    if summary:
        parts.append(_outcome(summary, planned))
        if summary.get("problems") and summary.get("stopped"):
            parts.append(f"<p class='bad'>stopped: {_e(summary['stopped'])}</p>")
    else:
        parts.append(f"<p id='outcome'>in progress: {len(history)} of {planned} rounds "
                     f"recorded</p>")
    parts.append("<h2>Dice, loss and time</h2><div class='plots'>" + "".join(
        f"<img alt='{_e(title)}' title='{_e(title)}' src='{src}'>"
        for title, src in _plots(history)) + "</div>")
    if summary:
        sites = summary.get("final", {}).get("sites", {})
        rows = "".join(f"<tr><td class='l'>{_e(s)}</td><td>{_fmt(m.get('num-examples'))}</td>"
                       + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in SCORES) + "</tr>"
                       for s, m in sorted(sites.items()))
        overall = summary.get("final", {}).get("overall", {})
        rows += ("<tr><th class='l'>all (case-weighted)</th><th></th>"
                 + "".join(f"<th>{_fmt(overall.get(k))}</th>" for k in SCORES) + "</tr>")
        scored = summary.get("final", {}).get("round")
        if scored is None:
            parts.append("<h2>Final model, per site</h2><p id='final' class='bad'>no round "
                         "was scored at any site: there are no final figures</p>")
        else:
            last = "the final round" if scored == summary["rounds_completed"] else (
                f"round {_e(scored)}, the last scored")
            parts.append(f"<h2>Final model, per site (scores of {last}, round {_e(scored)})"
                         f"</h2><table id='final'><tr><th class='l'>site</th><th>test cases"
                         f"</th>" + _score_headers() + f"</tr>{rows}</table>")
        structures = summary.get("structures", [])
        if len(structures) > 1 and scored is not None:
            parts.append("<p class='note'>with several structures each score above is, per "
                         "case, the mean over the structures where it is defined.</p>"
                         + _per_structure(structures, sites, overall))
    matrix = (summary or {}).get("cross_site")
    if matrix:
        scorers = sorted({t for row in matrix.values() for t in row})
        parts.append("<h2>Cross-site: Dice of each model at each site</h2>"
                     "<table id='cross-site'><tr><th class='l'>model</th>"
                     + "".join(f"<th>{_e(t)}</th>" for t in scorers) + "</tr>"
                     + "".join(f"<tr><td class='l'>{_e(m)}</td>"
                               + "".join(f"<td>{_fmt(row.get(t))}</td>" for t in scorers)
                               + "</tr>" for m, row in matrix.items()) + "</table>"
                     "<p class='note'>rows: the final global model, then each site's last "
                     "local model where that site's policy allowed it to be shared "
                     "(share-local-model).</p>")
    parts.append("<h2>Rounds</h2><table id='rounds'><tr><th>round</th><th>mean Dice</th>"
                 "<th>train loss</th><th>seconds</th><th>MB down</th><th>MB up</th>"
                 "<th class='l'>trained</th><th class='l'>failures</th><th>ε</th></tr>")
    for r in history:
        failures = "<br>".join(_e(f) for f in r.get("failures", []))
        parts.append(
            f"<tr><td>{r['round']}</td><td>{_fmt(r.get('dice_mean'))}</td>"
            f"<td>{_fmt(r.get('train_loss'))}</td><td>{_fmt(r.get('seconds'), 1)}</td>"
            f"<td>{r.get('bytes_down', 0) / 1e6:.1f}</td><td>{r.get('bytes_up', 0) / 1e6:.1f}"
            f"</td><td class='l'>{_e(', '.join(r.get('trained', [])))}</td>"
            f"<td class='l bad'>{failures}</td><td>{_fmt(r.get('epsilon'), 2)}</td></tr>")
    parts.append("</table>")
    if summary:
        privacy = summary.get("privacy", {})
        parts.append("<h2>Privacy</h2><table id='privacy'>" + "".join(
            f"<tr><th class='l'>{_e(PRIVACY_NAMES.get(k, k.replace('_', ' ')))}</th>"
            f"<td class='l'>{_fmt(v)}</td></tr>" for k, v in privacy.items()) + "</table>")
        left = summary.get("cases_left_out") or {}
        if left:
            parts.append("<p class='note'>cases left out at the sites (counts and kinds): "
                         + "; ".join(f"{_e(s)}: {_e(t)}" for s, t in left.items()) + "</p>")
    if summary and "harmonisation" in summary:
        parts.append(_harmonisation(summary.get("harmonisation")))
    parts.append("<h2>Settings</h2><table id='settings'>" + "".join(
        f"<tr><th class='l'>{_e(k)}</th><td class='l'>{_e(v)}</td></tr>"
        for k, v in sorted(config.items())) + "</table>")
    parts.append(f"<script>{CHECK}</script></body></html>")
    return "".join(parts)


def write_report(folder: Path, name: str, config: dict[str, Any],
                 history: list[dict[str, Any]], summary: dict[str, Any] | None) -> Path:
    """Write ``folder/report.html`` atomically; its path."""
    path = Path(folder) / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render(name, config, history, summary), encoding="utf-8")
    os.replace(tmp, path)
    return path
