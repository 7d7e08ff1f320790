"""The demo: port the shared parity fixture, animate and de-identify the shared samples, and
evaluate the result. Random-looking weights: the fixture checkpoint is a parity test model."""

import os
import pathlib
import time

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError

DEMO_FIXTURE = pathlib.Path("fixtures", "tpsmm_small")
DEMO_SAMPLES = pathlib.Path("samples")


def find_shared(explicit=None):
    """The shared/ folder with the demo fixture and samples: ``explicit``, else
    $SAFETRIAGE_SHARED, ../shared, shared, or the one beside the project."""
    candidates = [explicit] if explicit else [
        os.environ.get("SAFETRIAGE_SHARED"), "../shared", "shared",
        pathlib.Path(__file__).resolve().parents[2] / "shared"]
    for candidate in filter(None, candidates):
        if (pathlib.Path(candidate) / DEMO_FIXTURE / "checkpoint.pth.tar").is_file():
            return pathlib.Path(candidate)
    raise SafeTriageError("Could not find the shared demo data (fixtures/tpsmm_small and "
                          "samples/); name the shared folder or set SAFETRIAGE_SHARED.")


def run_demo(shared, out_dir, *, mode="relative", batch_size=16, precision="float32",
             overwrite=False, log=print):
    """Writes out_dir/model (kept between runs), animation.mp4, deid.mp4 and report/;
    ``log(line)`` reports each step."""
    from safetriage_jax.animate import animate_video
    from safetriage_jax.model_dir import save_model
    from safetriage_jax.deid.evaluation import evaluate_deid
    from safetriage_jax.deid.pipeline import DeidOptions, check_outputs, deidentify
    from safetriage_jax.models.config import from_upstream_yaml
    from safetriage_jax.porting import port_checkpoint
    shared, out_dir = pathlib.Path(shared), pathlib.Path(out_dir)
    source, driving = shared / DEMO_SAMPLES / "source.png", shared / DEMO_SAMPLES / "driving.mp4"
    model_dir, animation, deid = out_dir / "model", out_dir / "animation.mp4", out_dir / "deid.mp4"
    check_outputs(driving, source, deid, model_dir, report_dir=out_dir / "report",
                  overwrite=overwrite)
    outputs.check_output(animation, "video", inputs=(source, driving), overwrite=overwrite)
    log("Demo: RANDOM weights (the shared parity fixture's checkpoint), so the face will not look "
        "real; real weights come from `safetriage port-weights --checkpoint vox.pth.tar`.")
    if not outputs.is_ours(model_dir, "folder"):
        config = from_upstream_yaml(shared / DEMO_FIXTURE / "config.yaml")
        variables = port_checkpoint(shared / DEMO_FIXTURE / "checkpoint.pth.tar", config)
        save_model(model_dir, config, variables, overwrite=overwrite)
        log(f"Ported the fixture checkpoint to {model_dir}.")
    start = time.perf_counter()
    frames = animate_video(model_dir, source, driving, animation, mode=mode,
                           batch_size=batch_size, precision=precision, overwrite=overwrite)
    log(f"Wrote {animation}: {frames} frames in {time.perf_counter() - start:.1f} s.")
    summary = deidentify(driving, source, deid, model_dir, overwrite=overwrite,
                         options=DeidOptions(paste_back=True, batch_size=batch_size,
                                             precision=precision))
    log(f"Wrote {deid}: {summary['frames']} frames de-identified (face pasted back, "
        f"{summary['blank_frames']} blanked) in {summary['seconds']:.1f} s.")
    evaluate_deid(driving, deid, out_dir / "report", identity_path=source, stride=3,
                  overwrite=overwrite)
    log(f"Wrote the evaluation report {out_dir / 'report' / 'report.html'} (every 3rd frame).")
