"""Self-contained HTML evaluation report: every plot is an embedded base64 PNG (matplotlib Agg),
no scripts, fonts or links outside the file, so it can be archived or mailed as it is."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np

from evaluation.metrics import Evaluation


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{b64}">'


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _ci(v: Any, ci: Any) -> str:
    if not ci or ci[0] is None:
        return _num(v)
    return f"{_num(v)} ({_num(ci[0])}&ndash;{_num(ci[1])})"


def roc_plot(evaluations: dict[str, Evaluation]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for label, ev in evaluations.items():
        roc = ev.summary.get("roc")
        if roc:
            ax.plot(roc["fpr"], roc["tpr"], label=f"{label} AUROC {_num(ev.summary['auroc'])}")
        t = ev.summary.get("thresholds") or {}
        for name, marker in (("urgent", "^"), ("soon", "o")):
            if t.get(name) and t[name]["specificity"] is not None:
                ax.plot(1 - t[name]["specificity"], t[name]["sensitivity"], marker, color="k")
                ax.annotate(
                    name,
                    (1 - t[name]["specificity"], t[name]["sensitivity"]),
                    textcoords="offset points",
                    xytext=(6, -10),
                    fontsize=8,
                )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="Case-level ROC")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def pr_plot(evaluations: dict[str, Evaluation]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for label, ev in evaluations.items():
        pr = ev.metrics.calculate_precision_recall()
        ax.step(
            pr["recall"],
            pr["precision"],
            where="post",
            label=f"{label} AP {_num(ev.summary['ap'])} ({ev.summary['ap_level']})",
        )
    ax.set(
        xlabel="recall",
        ylabel="precision",
        title="Precision-recall (PI-CAI AP)",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def froc_plot(evaluations: dict[str, Evaluation]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for label, ev in evaluations.items():
        froc = ev.summary.get("froc")
        if froc and froc["fp_per_case"]:
            ax.step(froc["fp_per_case"], froc["sensitivity"], where="post", label=label)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set(
        xlabel="false positives per case",
        ylabel="lesion sensitivity",
        title="Lesion-level FROC (IoU >= 0.1)",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def calibration_plot(evaluations: dict[str, Evaluation]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for label, ev in evaluations.items():
        cal = ev.summary["calibration"]
        pts = [(b["mean_likelihood"], b["observed_fraction"]) for b in cal["bins"] if b["n"]]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, "o-", label=f"{label} ECE {_num(cal['ece'])}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="mean predicted likelihood",
        ylabel="observed csPCa fraction",
        title="Calibration (reliability)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def reliability_before_after_plot(before_after: dict[str, Any]) -> str:
    """Reliability diagram of raw and calibrated case likelihoods on the same cases."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for key, style in (("raw", "s--"), ("calibrated", "o-")):
        cal = before_after[key]
        pts = [(b["mean_likelihood"], b["observed_fraction"]) for b in cal["bins"] if b["n"]]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, style, label=f"{key} ECE {_num(cal['ece'])}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="mean predicted likelihood",
        ylabel="observed csPCa fraction",
        title=f"Reliability before/after ({before_after.get('method') or 'no calibration'})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def _p(entry: dict[str, Any]) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    return f"{_ci(entry['value'], entry['ci'])} ({entry['k']}/{entry['n']})"


def _bands_section(s: dict[str, Any]) -> str:
    b = s.get("bands")
    if not b:
        return ""
    gate = s.get("ood_gate") or {}
    rows = (
        f"<tr><td>urgent</td><td>PPV {_p(b['urgent']['ppv'])}</td></tr>"
        f"<tr><td>soon</td><td>PPV {_p(b['soon']['ppv'])}</td></tr>"
        f"<tr><td>routine</td><td>NPV {_p(b['routine']['npv'])}</td></tr>"
        f"<tr><td>soon or above</td><td>sensitivity {_p(b['soon_or_above']['sensitivity'])}"
        f"</td></tr><tr><td>urgent specificity</td><td>{_p(b['urgent_specificity'])}</td></tr>"
        f"<tr><td>three distinct bands</td><td>{'yes' if b['distinct'] else 'no'}</td></tr>"
    )
    for key, groups in (b["soon_or_above"].get("sensitivity_by") or {}).items():
        for name, entry in groups.items():
            rows += (
                f"<tr><td>soon or above, {html.escape(key)} {html.escape(name)}</td>"
                f"<td>sensitivity {_p(entry)}</td></tr>"
            )
    if gate.get("n"):
        rows += (
            f"<tr><td>out-of-distribution gate ({gate['n']} cases)</td><td>low confidence "
            f"{_num(gate['low_confidence'])}, outside {_num(gate['outside'])}</td></tr>"
        )
    where = html.escape(str(s.get("evaluated_on", "")))
    return (
        f"<h2>Priority bands ({where})</h2><table><tr><th>band</th><th>measured (CI)</th></tr>"
        f"{rows}</table>"
    )


def thumbnail(image: np.ndarray, overlay: np.ndarray | None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6, 1.6))
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    if overlay is not None and np.any(overlay > 0.05):
        ax.imshow(np.ma.masked_less(overlay, 0.05), cmap="hot", vmin=0, vmax=1, alpha=0.6)
    ax.axis("off")
    return _png(fig)


_CSS = """
body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.warn{background:#fff3cd;padding:.6em;border:1px solid #e0c060}
.plots img{margin:4px}.neg{color:#777}
"""


def _threshold_rows(t: dict[str, Any] | None) -> str:
    if not t:
        return "<tr><td colspan=6>the model has no thresholds</td></tr>"
    rows = []
    for name in ("urgent", "soon"):
        p = t[name]
        label = "urgent" if name == "urgent" else "urgent or soon"
        rows.append(
            f"<tr><td>{label} (likelihood &ge; {_num(p['threshold'])})</td>"
            f"<td>{_ci(p['sensitivity'], p['sensitivity_ci'])}</td>"
            f"<td>{_ci(p['specificity'], p['specificity_ci'])}</td>"
            f"<td>{p['tp']}/{p['tp'] + p['fn']}</td><td>{p['tn']}/{p['tn'] + p['fp']}</td></tr>"
        )
    return "".join(rows)


def render_html(
    evaluation: Evaluation,
    *,
    title: str = "radtriage evaluation",
    context: dict[str, Any] | None = None,
    thumbnails: bool = True,
) -> str:
    """One evaluation as a self-contained HTML page (no external URLs)."""
    s = evaluation.summary
    ctx = context or {}
    evs = {str(ctx.get("model", "model")): evaluation}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    if ctx.get("disclaimer"):
        parts.append(f"<p class='warn'>{html.escape(str(ctx['disclaimer']))}</p>")
    if ctx:
        parts.append(
            "<table>"
            + "".join(
                f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                for k, v in ctx.items()
                if k != "disclaimer"
            )
            + "</table>"
        )
    level = round(100 * (s.get("ci_level") or 0.95))
    parts.append(
        f"<h2>Summary</h2><table><tr><th>metric</th><th>value ({level}% CI)</th></tr>"
        f"<tr><td>cases (csPCa)</td><td>{s['n_cases']} ({s['n_cspca']})</td></tr>"
        f"<tr><td>AUROC (case level)</td><td>{_ci(s['auroc'], s['auroc_ci'])}</td></tr>"
        f"<tr><td>AP (PI-CAI, {s['ap_level']} level)</td><td>{_ci(s['ap'], s['ap_ci'])}</td></tr>"
        f"<tr><td>PI-CAI ranking score (AUROC+AP)/2</td>"
        f"<td>{_ci(s['picai_score'], s['picai_score_ci'])}</td></tr>"
        f"<tr><td>AP (case level)</td><td>{_ci(s['case_ap'], s['case_ap_ci'])}</td></tr>"
        f"<tr><td>ECE</td><td>{_ci(s['calibration']['ece'], s['calibration'].get('ece_ci'))}"
        f"</td></tr><tr><td>Brier score</td><td>{_num(s['calibration']['brier'])}</td></tr>"
    )
    if s.get("dice"):
        parts.append(
            f"<tr><td>gland Dice (mean)</td>"
            f"<td>{_ci(s['dice']['gland_mean'], s['dice']['gland_ci'])}</td></tr>"
        )
    if s.get("froc"):
        for fp, sens in s["froc"]["sensitivity_at"].items():
            parts.append(
                f"<tr><td>lesion sensitivity at {fp} FP/case</td><td>{_num(sens)}</td></tr>"
            )
    parts.append("</table>")
    parts.append(
        f"<h2>Priority thresholds</h2><p>Source: {html.escape(str(ctx.get('thresholds', '')))}"
        "</p><table><tr><th>flag</th><th>sensitivity (CI)</th><th>specificity (CI)</th>"
        f"<th>csPCa caught</th><th>non-csPCa below</th></tr>{_threshold_rows(s.get('thresholds'))}"
        "</table><p>Intervals for sensitivity/specificity: exact Clopper-Pearson; all others: "
        f"case-level bootstrap ({s['bootstrap']['n']} resamples, seed {s['bootstrap']['seed']})."
        "</p>"
    )
    op = s.get("operating_points")
    if op:
        parts.append(
            "<h3>Thresholds chosen from these cases</h3><table>"
            + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{_num(v)}</td></tr>" for k, v in op.items()
            )
            + "</table>"
        )
    parts.append(_bands_section(s))
    before_after = s.get("calibration_before_after")
    parts.append(
        "<h2>Plots</h2><div class='plots'>"
        + (
            _img(reliability_before_after_plot(before_after), "reliability before/after")
            if before_after
            else ""
        )
        + _img(roc_plot(evs), "ROC curve")
        + _img(pr_plot(evs), "precision-recall curve")
        + (_img(froc_plot(evs), "FROC curve") if s.get("froc") else "")
        + _img(calibration_plot(evs), "calibration curve")
        + "</div>"
    )
    for key, groups in (s.get("subgroups") or {}).items():
        parts.append(
            f"<h3>By {html.escape(key.replace('_', ' '))}</h3><table><tr><th>{html.escape(key)}"
            "</th><th>cases</th><th>csPCa</th><th>AUROC</th><th>sens. urgent|soon</th>"
            "<th>spec. urgent|soon</th></tr>"
        )
        for value, g in groups.items():
            t = (g.get("thresholds") or {}).get("soon") or {}
            parts.append(
                f"<tr><td>{html.escape(value)}</td><td>{g['n_cases']}</td><td>{g['n_cspca']}</td>"
                f"<td>{_num(g['auroc'])}</td><td>{_num(t.get('sensitivity'))}</td>"
                f"<td>{_num(t.get('specificity'))}</td></tr>"
            )
        parts.append("</table>")
    parts.append(
        "<h2>Cases</h2><table><tr><th>case</th><th>csPCa</th><th>likelihood</th>"
        "<th>vendor</th><th>gland Dice</th><th>highest-likelihood slice</th></tr>"
    )
    order = sorted(evaluation.records, key=lambda r: -r.likelihood)
    by_id = {c["case_id"]: c for c in s["cases"]}
    for r in order:
        thumb = (
            _img(thumbnail(r.image, r.overlay), f"{r.case_id} slice", 110)
            if thumbnails and r.image is not None
            else ""
        )
        c = by_id.get(r.case_id, {})
        parts.append(
            f"<tr><td>{html.escape(r.case_id)}</td>"
            f"<td>{'yes' if r.is_cspca else '<span class=neg>no</span>'}</td>"
            f"<td>{_num(r.likelihood)}</td><td>{html.escape(str(r.vendor or ''))}</td>"
            f"<td>{_num(c.get('gland_dice'))}</td><td>{thumb}</td></tr>"
        )
    parts.append("</table></body></html>")
    return "".join(parts)


def render_comparison_html(
    a: Evaluation, b: Evaluation, comparison: dict[str, Any], *, labels: tuple[str, str]
) -> str:
    """Two model versions on the same cases, side by side, with the paired test."""
    evs = {labels[0]: a, labels[1]: b}
    rows = []
    for key, name in (("auroc", "AUROC"), ("ap", "AP (PI-CAI)"), ("picai_score", "PI-CAI score")):
        rows.append(
            f"<tr><td>{name}</td><td>{_ci(a.summary[key], a.summary[key + '_ci'])}</td>"
            f"<td>{_ci(b.summary[key], b.summary[key + '_ci'])}</td></tr>"
        )
    d = comparison["picai_score"]["difference"]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>radtriage comparison</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(labels[0])} vs "
        f"{html.escape(labels[1])}</h1><table><tr><th>metric</th><th>{html.escape(labels[0])}"
        f"</th><th>{html.escape(labels[1])}</th></tr>{''.join(rows)}</table>"
        f"<p>Paired bootstrap on the same {a.summary['n_cases']} cases: PI-CAI score difference "
        f"(B - A) {_ci(d['value'], d['ci'])}, p = {_num(comparison['picai_score']['p_value'])}"
        "</p><div class='plots'>"
        + _img(roc_plot(evs), "ROC curves")
        + _img(pr_plot(evs), "precision-recall curves")
        + _img(calibration_plot(evs), "calibration curves")
        + "</div></body></html>"
    )
