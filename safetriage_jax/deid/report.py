"""The evaluate-deid report: metrics.json, PNG plots and a self-contained report.html.

Files are written into a hidden staging folder inside the report directory and moved into
place at the end, so a failed run leaves the previous report (and deid.json) untouched.
"""

import base64
import html
import json
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image

PLOTS = ("tracks.png", "asymmetry.png", "frames.png", "privacy_utility.png")
STYLE = {"original": dict(color="black", linewidth=2.0), "deid": dict(color="tab:green"),
         "blur": dict(color="tab:blue"), "pixelate": dict(color="tab:orange"),
         "mask": dict(color="tab:red")}


def _figure(rows, cols=1, height=2.2):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(9, height * rows), squeeze=False)
    return plt, fig, axes[:, 0] if cols == 1 else axes


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_series(path, signals, fps, keys, titles, centred=()):
    """One subplot per signal over time, a line per method."""
    plt, fig, axes = _figure(len(keys))
    for ax, key, title in zip(axes, keys, titles):
        for name, values in signals.items():
            y = np.asarray(values[key], float)
            if key in centred and np.isfinite(y).any():
                y = y - np.nanmedian(y)
            ax.plot(np.arange(len(y)) / fps, y, label=name, **STYLE.get(name, {}))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=len(signals))
    axes[-1].set_xlabel("seconds")
    _save(plt, fig, path)


def plot_frames(path, analyses, rows=4, height=160):
    """Side-by-side frames at evenly spaced times, detected landmarks drawn as dots."""
    count = len(next(iter(analyses.values())).frames)
    times = np.unique(np.linspace(0, count - 1, rows).round().astype(int))
    plt, fig, axes = _figure(len(times), len(analyses), height=2.2)
    axes = np.asarray(axes).reshape(len(times), len(analyses))
    for r, t in enumerate(times):
        for c, (name, analysis) in enumerate(analyses.items()):
            ax = axes[r, c]
            frame = analysis.frames[t]
            scale = height / frame.shape[0]
            ax.imshow(np.asarray(Image.fromarray(frame).resize(
                (max(1, round(frame.shape[1] * scale)), height))))
            if analysis.detected_T[t]:
                points = analysis.landmarks_T68x2[t] * scale
                ax.scatter(points[:, 0], points[:, 1], s=2, c="lime")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"frame {t}", fontsize=8)
    _save(plt, fig, path)


def plot_privacy_utility(path, metrics):
    plt, fig, axes = _figure(1, height=4)
    ax = axes[0]
    for name, m in metrics["methods"].items():
        x, y = m["privacy"]["reid_rate"], m["motion"]["landmark_correlation"]
        y = 0.0 if y is None else y
        ax.scatter([x], [y], s=60, **{k: v for k, v in STYLE.get(name, {}).items() if k == "color"})
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("re-identification rate (lower = more private)")
    ax.set_ylabel("landmark-motion correlation (higher = more useful)\n(0 where no landmarks)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def _cell(value):
    return "-" if value is None else f"{value:.3f}"


def html_page(metrics, images):
    """A self-contained page: the headline table and the plots inlined as base64 PNGs."""
    indices = list(next(iter(metrics["methods"].values()))["asymmetry"])
    header = ["method", "face detected", "re-id rate", "top-1 (gallery)", "landmark r", "NME",
              "blink r", "mouth r"] + [f"CCC {i}" for i in indices]
    rows = []
    for name, m in metrics["methods"].items():
        p, mo, a = m["privacy"], m["motion"], m["asymmetry"]
        values = [p["detected_share"], p["reid_rate"], p["top1_rate"], mo["landmark_correlation"],
                  mo["nme"], mo["blink_r"], mo["mouth_r"]] + [a[i]["ccc"] for i in indices]
        rows.append("<tr><td>" + html.escape(name) + "</td>" +
                    "".join(f"<td>{_cell(v)}</td>" for v in values) + "</tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in metrics["notes"])
    pictures = "".join(f'<h2>{html.escape(name)}</h2><img src="data:image/png;base64,{data}">'
                       for name, data in images.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>De-identification report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>De-identification report</h1>
<p>Original: {html.escape(metrics["original"])}<br>De-identified: {html.escape(metrics["deid"])}<br>
{metrics["frames"]} frames evaluated (stride {metrics["stride"]}), {metrics["original_face_frames"]} with a
face in the original. Gallery: {html.escape(", ".join(metrics["gallery"]))}. Re-identification: embedding
distance &lt; {metrics["same_person_threshold"]}. Landmark r: correlation of size/roll-normalised
landmark displacements with the original's; NME in inter-ocular distances; CCC: Lin's concordance of
the asymmetry indices.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in header)}</tr>{"".join(rows)}</table>
<ul>{notes}</ul>{pictures}</body></html>"""


def write_report(report_dir, metrics, signals, analyses, fps):
    report_dir = pathlib.Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".partial-", dir=report_dir))
    try:
        plot_series(staging / "tracks.png", signals, fps, ["blink", "mouth", "mouth_corner_y"],
                    ["eye opening (mean eye aspect ratio)", "mouth opening",
                     "image-left mouth corner height (inter-ocular units, median removed)"],
                    centred={"mouth_corner_y"})
        keys = [k for k in next(iter(signals.values())) if k.startswith("asymmetry_")]
        plot_series(staging / "asymmetry.png", signals, fps, keys,
                    [k.replace("asymmetry_", "asymmetry: ").replace("_", " ") for k in keys])
        plot_frames(staging / "frames.png", analyses)
        plot_privacy_utility(staging / "privacy_utility.png", metrics)
        images = {name: base64.b64encode((staging / name).read_bytes()).decode() for name in PLOTS}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (staging / "report.html").write_text(html_page(metrics, images))
        for path in staging.iterdir():
            path.replace(report_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report_dir / "report.html"
