"""The evaluate-deid report: metrics.json, PNG plots and a self-contained report.html.

Everything is built in a hidden staging folder that replaces the report folder at the end, so a
failed run leaves no half-written report. The report is meant to be shared: it names files, not
folders, and frames.png shows the original with its face masked unless asked otherwise.
"""

import base64
import html
import json
import pathlib

import numpy as np
from PIL import Image

from safetriage_jax import outputs

PLOTS = ("tracks.png", "asymmetry.png", "frames.png", "privacy_utility.png")
STYLE = {"original": dict(color="black", linewidth=2.0), "deid": dict(color="tab:green"),
         "blur": dict(color="tab:blue"), "pixelate": dict(color="tab:orange"),
         "mask": dict(color="tab:red")}


def _figure(rows, cols=1, height=2.2, width=9):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(width, height * rows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_series(path, series, fps, keys, titles):
    """One subplot per signal over time, a line per method (gaps where no face)."""
    plt, fig, axes = _figure(len(keys))
    for ax, key, title in zip(axes[:, 0], keys, titles):
        for name, signals in series.items():
            values_T = np.asarray(signals[key], float)
            ax.plot(np.arange(len(values_T)) / fps, values_T, label=name, **STYLE.get(name, {}))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=len(series))
    axes[-1, 0].set_xlabel("seconds")
    _save(plt, fig, path)


def plot_frames(path, analyses, fps, rows=4, height=160):
    """Side-by-side frames at evenly spaced times, detected landmarks drawn as dots (each
    analysis holds the same few frames, {frame index: frame})."""
    kept = sorted(analyses["original"].frames)
    times = [kept[i] for i in np.unique(np.linspace(0, len(kept) - 1, rows).round().astype(int))]
    plt, fig, axes = _figure(len(times), len(analyses), height=2.2,
                             width=max(6, 2.2 * len(analyses)))
    for r, t in enumerate(times):
        for c, (name, analysis) in enumerate(analyses.items()):
            ax, frame = axes[r, c], analysis.frames[t]
            scale = height / frame.shape[0]
            ax.imshow(np.asarray(Image.fromarray(frame).resize(
                (max(1, round(frame.shape[1] * scale)), height), Image.BILINEAR)))
            if analysis.detected_T[t]:
                points_68x2 = analysis.landmarks_T68x2[t] * scale
                ax.scatter(points_68x2[:, 0], points_68x2[:, 1], s=2, c="lime")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{t / fps:.1f} s", fontsize=8)
    _save(plt, fig, path)


def plot_privacy_utility(path, metrics):
    """Re-identification rate against landmark-motion correlation, one point per method."""
    plt, fig, axes = _figure(1, height=4, width=6)
    ax = axes[0, 0]
    placed = {}  # methods at the same point get their labels stacked
    for name, m in metrics["methods"].items():
        x, y = m["privacy"]["reid_rate"], m["motion"]["landmark_correlation"]
        label = name if y is not None else f"{name} (no landmarks)"
        y = 0.0 if y is None else y
        ax.scatter([x], [y], s=60, color=STYLE.get(name, {}).get("color", "gray"))
        stack = placed.setdefault((round(x, 2), round(y, 2)), [])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4 + 11 * len(stack)),
                    fontsize=9)
        stack.append(name)
    ax.set_xlabel("re-identification rate (lower = more private)")
    ax.set_ylabel("landmark-motion correlation\n(higher = more useful)")
    ax.set_xlim(-0.05, 1.1)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def _jsonable(value, digits=5):
    """NumPy arrays to lists, NaN/inf to None (JSON null), series floats rounded."""
    if isinstance(value, dict):
        return {k: _jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        return [None if not np.isfinite(v) else round(float(v), digits) for v in value.ravel()]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def json_metrics(metrics):
    """What metrics.json holds: the metrics, with only the asymmetry series per method."""
    out = {k: v for k, v in metrics.items() if k != "series"}
    out["series"] = {name: {k: v for k, v in signals.items() if k.startswith("asymmetry_")}
                     for name, signals in metrics["series"].items()}
    return _jsonable(out)


def _cell(value):
    return "-" if value is None else f"{value:.3f}"


def html_page(metrics, images):
    """A self-contained page: the headline table and the plots inlined as base64 PNGs."""
    indices = list(next(iter(metrics["methods"].values()))["asymmetry"]) if metrics["methods"] else []
    header = ["method", "face detected", "mean distance", "re-id rate", "top-1 (gallery)",
              "landmark r", "NME", "blink r", "mouth r"] + [f"CCC {i}" for i in indices]
    rows = []
    for name, m in metrics["methods"].items():
        p, mo, a = m["privacy"], m["motion"], m["asymmetry"]
        values = [p["detected_share"], p["mean_distance"], p["reid_rate"], p["top1_rate"],
                  mo["landmark_correlation"], mo["nme"], mo["blink_r"], mo["mouth_r"]]
        values += [a[i]["ccc"] for i in indices]
        rows.append(f"<tr><td>{html.escape(name)}</td>"
                    + "".join(f"<td>{_cell(v)}</td>" for v in values) + "</tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in metrics["notes"])
    pictures = "".join(f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
                       f'src="data:image/png;base64,{data}">' for name, data in images.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>De-identification report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>De-identification report</h1>
<p>Original: {html.escape(metrics["original"])}<br>De-identified: {html.escape(metrics["deid"])}<br>
{metrics["frames"]} frames evaluated (stride {metrics["stride"]}), {metrics["original_face_frames"]} with
a face in the original. Gallery: {html.escape(", ".join(metrics["gallery"]))}.</p>
<p>Face detected: share of the original's face frames where the method's video shows a detected face.
Re-id rate: share with a face-embedding distance to the original under
{metrics["same_person_threshold"]} (dlib's same-person threshold; the attacker also fits landmarks
where the face should be). Top-1: share where the original person is the closest gallery entry.
Landmark r: correlation of size- and roll-normalised landmark displacements with the original's;
NME in inter-ocular distances; CCC: Lin's concordance of the asymmetry indices over time.</p>
<table><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr>{"".join(rows)}</table>
<ul>{notes}</ul>{pictures}</body></html>"""


def _write_files(folder, metrics, analyses):
    fps, series = metrics["fps"], metrics["series"]
    plot_series(folder / "tracks.png", series, fps,
                ["blink", "mouth", "mouth_corner_left_dy", "mouth_corner_right_dy"],
                ["eye opening (mean eye aspect ratio)", "mouth opening (inner-lip gap / width)",
                 "image-left mouth corner, vertical displacement (inter-ocular units)",
                 "image-right mouth corner, vertical displacement (inter-ocular units)"])
    keys = [k for k in series["original"] if k.startswith("asymmetry_")]
    plot_series(folder / "asymmetry.png", series, fps, keys,
                [k.replace("asymmetry_", "asymmetry: ").replace("_", " ") for k in keys])
    plot_frames(folder / "frames.png", analyses, fps)
    plot_privacy_utility(folder / "privacy_utility.png", metrics)
    images = {name: base64.b64encode((folder / name).read_bytes()).decode() for name in PLOTS}
    (folder / "metrics.json").write_text(json.dumps(json_metrics(metrics), indent=1))
    (folder / "report.html").write_text(html_page(metrics, images))


def write_report(report_dir, metrics, analyses, *, extra_json=None, overwrite=False, inputs=()):
    """Writes metrics.json, the PNGs and report.html into ``report_dir``, whole or not at all;
    returns the page's path. ``extra_json``: {file name: dict} written beside (deid.json).

    ``analyses`` maps "original", "deid" and each baseline to its evaluation.Analysis (frames
    and landmarks, for frames.png). ``overwrite`` replaces an earlier report (only a folder of
    report files); ``inputs`` are never inside the folder.
    """
    with outputs.atomic_directory(report_dir, overwrite=overwrite, inputs=inputs) as staging:
        _write_files(staging, metrics, analyses)
        for name, data in (extra_json or {}).items():
            (staging / name).write_text(json.dumps(data, indent=2))
    return pathlib.Path(report_dir) / "report.html"
