"""The ``safetriage`` command line: a thin layer over the library; errors print without traceback."""

import argparse
import logging
import os
import pathlib
import signal
import sys
import time
import warnings

from safetriage_jax.errors import SafeTriageError

MAX_BATCH = 4096  # = safetriage_jax.animate.MAX_BATCH (not imported: keeps --help fast)
DEFAULT_CHECKPOINT = "models/vox"
DESCRIPTION = """\
De-identify facial videos: a synthetic identity makes the patient's facial movements, so a
clinician can judge motion (blinks, asymmetry, speech) without seeing who the patient is.

Start here:
  safetriage demo                                  try everything on the bundled samples
  safetriage port-weights --checkpoint vox.pth.tar --config vox-256 --out models/vox
  safetriage deid --input patient.mp4 --identity synthetic.png --out deid.mp4 --report report/

Outputs are written whole or not at all, never over an input, and an existing output is
replaced only with --overwrite and only if this tool wrote it (it carries the tool's mark).
With --paste-back every face but the subject's is masked black. Safe to share: the
de-identified video (audio and metadata dropped by default) and the report (the original's
face masked, file names only). Not safe: the patient's video, face-crop inputs, and reports
made with --report-show-original.
"""


def _bounded(kind, low, high):
    """An argparse type: ``kind`` (int or float) within [low, high]."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g} (got {text})")
        return value
    return parse


def _framing_range(name):
    from safetriage_jax.deid.framing import RANGES
    low, high = next((lo, hi) for n, lo, hi in RANGES if n == name)
    return _bounded(float, low, high)


def _version():
    from importlib import metadata
    try:
        return metadata.version("safetriage-jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def cmd_port_weights(args):
    import dataclasses

    from safetriage_jax.models.config import load_model_config
    from safetriage_jax.porting import port_to_directory
    config = load_model_config(args.config, image_size=args.image_size)
    if args.image_size:
        config = dataclasses.replace(config, image_size=args.image_size)
    out = port_to_directory(args.checkpoint, config, args.out, safetensors=args.safetensors,
                            overwrite=args.overwrite, inputs=(args.config,))
    print(f"Ported {args.checkpoint} -> {out} (image size {config.image_size}, "
          f"num_tps {config.num_tps}).")


def cmd_export_weights(args):
    from safetriage_jax.model_dir import load_model
    from safetriage_jax.outputs import check_output
    from safetriage_jax.porting import export_checkpoint
    check_output(args.out, "torch", inputs=(args.checkpoint,), overwrite=args.overwrite)
    _, variables = load_model(args.checkpoint)
    export_checkpoint(variables, args.out, overwrite=args.overwrite, inputs=(args.checkpoint,))
    print(f"Wrote upstream-layout checkpoint {args.out}.")


def cmd_parity(args):
    from safetriage_jax.parity import run_parity
    outputs, errors = run_parity(args.checkpoint, args.inputs, args.out, config_spec=args.config,
                                 overwrite=args.overwrite)
    print(f"Wrote {len(outputs)} outputs to {args.out}.")
    if errors:
        print(f"\n{'output':32s} relative error")
        for name, err in errors.items():
            flag = "" if err < args.tolerance else "   <-- above tolerance"
            print(f"{name:32s} {err:.2e}{flag}")
        worst = max(errors.values())
        print(f"\nworst {worst:.2e} (tolerance {args.tolerance:g})")
        if worst >= args.tolerance:
            raise SafeTriageError(f"Parity failed: worst relative error {worst:.2e} >= "
                                  f"{args.tolerance:g}.")


def cmd_animate(args):
    from safetriage_jax.animate import animate_video
    start = time.perf_counter()
    frames = animate_video(args.checkpoint, args.source, args.driving, args.out, mode=args.mode,
                           batch_size=args.batch, warp_implementation=args.warp_implementation,
                           precision=args.precision, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    print(f"Wrote {args.out}: {frames} frames in {seconds:.1f} s ({frames / seconds:.1f} frames/s, "
          "compilation included).")


def cmd_demo(args):
    from safetriage_jax.demo import find_shared, run_demo
    run_demo(find_shared(args.shared), args.out, mode=args.mode, batch_size=args.batch,
             precision=args.precision, overwrite=args.overwrite)


def _run_training(args, train_fn, what, result, hint=""):
    """Shared by `train` and `train-prompt`: multi-host set-up, a persistent compilation cache,
    the config, the run, and a one-line result."""
    import jax
    from safetriage_jax.config_loader import load_python_config
    from safetriage_jax.train import distributed
    distributed.initialize(distributed.launch_settings(
        args.coordinator_address, args.num_processes, args.process_id), auto=args.distributed,
        timeout_s=args.coordinator_timeout)
    if not jax.config.jax_compilation_cache_dir:  # restarts and --resume skip recompiling
        jax.config.update("jax_compilation_cache_dir",
                          str(pathlib.Path("~/.cache/safetriage-jax/xla").expanduser()))
    config = load_python_config(args.config)
    start = time.perf_counter()
    _, metrics = train_fn(config, args.workdir, resume=args.resume)
    if distributed.is_primary():
        print(f"Trained {what} to {args.workdir} in {time.perf_counter() - start:.0f} s; last "
              f"loss {float(metrics.get('loss', float('nan'))):.4f}. Result: "
              f"{pathlib.Path(args.workdir) / result}{hint}")


def cmd_train(args):
    from safetriage_jax.train.backbone import train
    _run_training(args, train, "the backbone", "model")


def cmd_train_prompt(args):
    from safetriage_jax.train.prompt import train_prompt
    _run_training(args, train_prompt, "the prompt generator", "prompt",
                  " (use it with `safetriage deid --prompt-checkpoint`)")


def cmd_evaluate(args):
    import json
    from safetriage_jax import outputs
    from safetriage_jax.config_loader import load_python_config
    from safetriage_jax.train.evaluate import evaluate_model_directory
    if args.out:
        outputs.check_output(args.out, "json", inputs=(args.model,), overwrite=args.overwrite)
    metrics = evaluate_model_directory(load_python_config(args.config), args.model,
                                       split=args.split, num_clips=args.num_clips)
    print(json.dumps(metrics, indent=2))
    if args.out:
        outputs.write_json(args.out, metrics, inputs=(args.model,), overwrite=args.overwrite)


def cmd_deid(args):
    from safetriage_jax.deid.framing import FramingOptions
    from safetriage_jax.deid.pipeline import DeidOptions, deidentify
    checkpoint = args.checkpoint or os.environ.get("SAFETRIAGE_CHECKPOINT", DEFAULT_CHECKPOINT)
    if not pathlib.Path(checkpoint).exists():
        raise SafeTriageError(f"No model directory at {checkpoint}. Port upstream's pretrained "
                              "weights once: `safetriage port-weights --checkpoint vox.pth.tar "
                              f"--config vox-256 --out {DEFAULT_CHECKPOINT}` (or pass --checkpoint).")
    options = DeidOptions(mode=args.mode, reference=args.reference, paste_back=args.paste_back,
                          detector=args.detector, face_backend=args.face_backend,
                          keep_audio=args.keep_audio,
                          batch_size=args.batch, warp_implementation=args.warp_implementation,
                          precision=args.precision, framing=FramingOptions(scale=args.crop_scale),
                          subject=args.subject)
    summary = deidentify(args.input, args.identity, args.out, checkpoint, options=options,
                         prompt_dir=args.prompt_checkpoint, report_dir=args.report,
                         overwrite=args.overwrite,
                         report_show_original=args.report_show_original)
    print(f"Wrote {args.out}: {summary['frames']} frames ({summary['face_frames']} with the face "
          f"found, {summary['filled_frames']} filled between detections, "
          f"{summary['blank_frames']} blanked, {summary['uncovered_frames']} of them because the "
          f"paste would not cover the face) in {summary['seconds']:.1f} s "
          f"({summary['frames_per_second']:.1f} frames/s). Audio {summary['audio']}, metadata dropped.")
    for note in summary["notes"]:
        print(f"note: {note}")
    if args.report:
        print(f"Report: {pathlib.Path(args.report) / 'report.html'}")


def cmd_evaluate_deid(args):
    from safetriage_jax.deid.evaluation import evaluate_deid
    baselines = tuple(b for b in args.baselines.split(",") if b)
    metrics = evaluate_deid(args.original, args.deid, args.report, identity_path=args.identity,
                            gallery_dir=args.gallery, baselines=baselines,
                            max_frames=args.max_frames, stride=args.stride,
                            overwrite=args.overwrite, show_original=args.report_show_original,
                            face_backend=args.face_backend)
    print(f"{'method':<10} {'re-id rate':>10} {'top-1':>6} {'landmark r':>10} {'NME':>6}")
    for name, method in metrics["methods"].items():
        privacy, motion = method["privacy"], method["motion"]
        print(f"{name:<10} {_fmt(privacy['reid_rate']):>10} {_fmt(privacy['top1_rate']):>6} "
              f"{_fmt(motion['landmark_correlation']):>10} {_fmt(motion['nme']):>6}")
    for note in metrics["notes"]:
        print(f"note: {note}")
    print(f"Report: {pathlib.Path(args.report) / 'report.html'}")


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def build_parser():
    parser = argparse.ArgumentParser(prog="safetriage", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="`safetriage COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"safetriage {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_overwrite(p, what="the output"):
        p.add_argument("--overwrite", action="store_true",
                       help=f"replace {what} if it exists (only something this tool wrote; "
                            "never an input)")

    def add_config(p, required):
        p.add_argument("--config", required=required,
                       help="upstream YAML (vox-256.yaml), configs/tpsmm.py[:variant] or a preset name")
        p.add_argument("--image-size", type=_bounded(int, 32, 4096), default=None,
                       help="model resolution (default: from the config name, else 256)")

    p = sub.add_parser("port-weights", help="upstream .pth.tar -> Flax model directory (orbax)")
    p.add_argument("--checkpoint", required=True, help="upstream checkpoint, e.g. vox.pth.tar")
    add_config(p, required=True)
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--safetensors", action="store_true", help="also write model.safetensors")
    add_overwrite(p, "an existing model directory at --out")
    p.set_defaults(func=cmd_port_weights)

    p = sub.add_parser("export-weights", help="Flax model directory -> upstream-layout .pth.tar")
    p.add_argument("--checkpoint", required=True, help="model directory")
    p.add_argument("--out", required=True, help="the .pth.tar to write")
    add_overwrite(p, "an existing checkpoint file at --out")
    p.set_defaults(func=cmd_export_weights)

    p = sub.add_parser("parity", help="run every network on an npz's frames, upstream layout")
    p.add_argument("--checkpoint", required=True, help="upstream .pth.tar or model directory")
    add_config(p, required=False)
    p.add_argument("--inputs", required=True, help="npz with source and driving (N,3,H,W) in [0,1]")
    p.add_argument("--out", required=True, help="npz to write the outputs to")
    p.add_argument("--tolerance", type=_bounded(float, 1e-12, 1.0), default=1e-4,
                   help="max relative error when --inputs also holds expected outputs")
    add_overwrite(p)
    p.set_defaults(func=cmd_parity)

    def add_face_backend(p):
        from safetriage_jax.deid.faces import DEFAULT_FACE_BACKEND, FACE_BACKENDS
        p.add_argument("--face-backend", default=DEFAULT_FACE_BACKEND, choices=FACE_BACKENDS,
                       help="face detection, landmarks and embeddings: jax (CenterFace and "
                            "dlib's models in JAX, batched on the device) "
                            f"or dlib (the reference, one frame at a time); default "
                            f"{DEFAULT_FACE_BACKEND}")

    def add_animation_options(p):
        p.add_argument("--mode", default="relative", choices=["relative", "standard", "avd"])
        p.add_argument("--batch", type=_bounded(int, 1, MAX_BATCH), default=16,
                       help="driving frames per device call")
        p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                       help="compute dtype of the networks (bfloat16: faster on GPU/TPU)")

    p = sub.add_parser("animate", help="animate a source image with a driving video")
    p.add_argument("--checkpoint", required=True, help="model directory from port-weights")
    p.add_argument("--source", required=True, help="source image (png/jpg)")
    p.add_argument("--driving", required=True, help="driving video")
    p.add_argument("--out", required=True, help="output mp4 (h264)")
    add_animation_options(p)
    p.add_argument("--warp-implementation", default=None, help="grid-sample backend (default: best)")
    add_overwrite(p)
    p.set_defaults(func=cmd_animate)

    def add_training(name, help, config_help, func):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", required=True, help=config_help)
        p.add_argument("--workdir", required=True, help="checkpoints, logs, samples and the result")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        p.add_argument("--distributed", action="store_true",
                       help="multi-host on a detected cluster (SLURM, Open MPI, Kubernetes, "
                            "Cloud TPU); or give the three settings below")
        p.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="multi-host: process 0's address (or $SAFETRIAGE_COORDINATOR_ADDRESS)")
        p.add_argument("--num-processes", default=None, metavar="N",
                       help="multi-host: processes in the run (or $SAFETRIAGE_NUM_PROCESSES)")
        p.add_argument("--process-id", default=None, metavar="I",
                       help="multi-host: this process, 0..N-1 (or $SAFETRIAGE_PROCESS_ID)")
        p.add_argument("--coordinator-timeout", type=_bounded(float, 1, 24 * 3600), default=300,
                       metavar="SECONDS",
                       help="multi-host: how long to wait for the coordinator and every "
                            "process to join before giving up with an error (default 300)")
        p.set_defaults(func=func)

    add_training("train", "train the backbone (configs/train.py:VARIANT)",
                 "configs/train.py:VARIANT[,key=value] (variants: vox-256, synthetic-256, small)",
                 cmd_train)
    add_training("train-prompt", "train the prompt generator, backbone frozen "
                 "(configs/prompt.py:VARIANT)",
                 "configs/prompt.py:VARIANT[,key=value] (variants: vox-256, small)",
                 cmd_train_prompt)

    p = sub.add_parser("evaluate", help="reconstruction / motion-transfer metrics on held-out clips")
    p.add_argument("--config", required=True, help="the training config (for the dataset)")
    p.add_argument("--model", required=True, help="model directory (e.g. WORKDIR/model)")
    p.add_argument("--split", default="test")
    p.add_argument("--num-clips", type=_bounded(int, 0, 10 ** 6), default=0,
                   help="default: the config's eval.num_clips")
    p.add_argument("--out", default=None, help="also write the metrics as JSON here")
    add_overwrite(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("deid", help="de-identify a facial video with a synthetic identity")
    p.add_argument("--input", required=True, help="the patient's video")
    p.add_argument("--identity", required=True, help="image of the synthetic identity")
    p.add_argument("--out", required=True, help="output mp4 (h264, video only)")
    p.add_argument("--checkpoint", default=None,
                   help=f"model directory (default: $SAFETRIAGE_CHECKPOINT or {DEFAULT_CHECKPOINT})")
    p.add_argument("--prompt-checkpoint", default=None,
                   help="prompt generator from `safetriage train-prompt` (WORKDIR/prompt)")
    p.add_argument("--report", default=None,
                   help="also write deid.json and the privacy/utility evaluation here")
    p.add_argument("--paste-back", action="store_true",
                   help="write full frames with the face replaced (default: the face crop)")
    p.add_argument("--reference", default="first", choices=["first", "neutral", "best"],
                   help="frame relative motion starts from: first with a face, most neutral and "
                        "frontal, or most like the identity's pose")
    p.add_argument("--crop-scale", type=_framing_range("scale"), default=1.8,
                   help="crop side / face box side (1.2 to 5); with --paste-back, frames where "
                        "the square would not cover the whole face are blanked")
    p.add_argument("--subject", default="largest", metavar="largest|center|X0,Y0,X1,Y1",
                   help="the patient's face when several are found: the largest (default), the "
                        "one nearest the frame's centre, or the one in this box (frame pixels); "
                        "with --paste-back every other face is masked black")
    p.add_argument("--keep-audio", action="store_true",
                   help="copy the input's audio (re-encoded AAC); dropped by default: voices identify")
    add_face_backend(p)
    p.add_argument("--detector", default=None, choices=["hog", "centerface"],
                   help="with --face-backend dlib: dlib HOG (default) or CenterFace run by "
                        "OpenCV; the jax backend always uses CenterFace")
    add_animation_options(p)
    p.add_argument("--warp-implementation", default=None, help="grid-sample backend (default: best)")
    p.add_argument("--report-show-original", action="store_true",
                   help="show the original's face in the report (then the report identifies "
                        "the patient: do not share it)")
    add_overwrite(p, "the output video and report")
    p.set_defaults(func=cmd_deid)

    p = sub.add_parser("evaluate-deid", help="privacy / motion / asymmetry report vs baselines")
    p.add_argument("--original", required=True, help="the original video")
    p.add_argument("--deid", required=True, help="its de-identified version")
    p.add_argument("--report", required=True, help="directory for metrics.json, report.html, PNGs")
    p.add_argument("--identity", default=None, help="the synthetic identity image (joins the gallery)")
    p.add_argument("--gallery", default=None,
                   help="folder of other people's images/videos for the re-identification attack")
    p.add_argument("--baselines", default="blur,pixelate,mask",
                   help="comma-separated traditional methods to compare (blur, pixelate, mask)")
    p.add_argument("--max-frames", type=_bounded(int, 1, 10 ** 9), default=None,
                   help="evaluate at most this many frames")
    p.add_argument("--stride", type=_bounded(int, 1, 10 ** 6), default=1,
                   help="evaluate every n-th frame")
    p.add_argument("--report-show-original", action="store_true",
                   help="show the original's face in frames.png (the report then identifies "
                        "the patient)")
    add_face_backend(p)
    add_overwrite(p, "an existing report folder")
    p.set_defaults(func=cmd_evaluate_deid)

    p = sub.add_parser("demo", help="port the shared fixture; animate and de-identify the shared "
                                    "samples, with the evaluation report")
    p.add_argument("--shared", default=None, help="the shared/ folder (default: ../shared)")
    p.add_argument("--out", default="out/demo", help="where to write the model and the video")
    add_animation_options(p)
    add_overwrite(p, "the demo's videos and report")
    p.set_defaults(func=cmd_demo)
    return parser


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: staged outputs are removed


def _end_progress_bars():
    """Closes the progress bars still open, so a message starts on a line of its own."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _report(message):
    _end_progress_bars()
    print(message, file=sys.stderr, flush=True)


def main(argv=None):
    from safetriage_jax.outputs import OutputExistsError
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a usage error (already printed)
        return exit.code
    try:
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        with warnings.catch_warnings():
            if not sys.warnoptions and not os.environ.get("PYTHONWARNINGS"):
                warnings.simplefilter("ignore")  # library warnings are not for users; -W shows them
                logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax logs its failures too
            args.func(args)
    except OutputExistsError as err:
        _report(f"error: {err} (pass --overwrite to replace it)")
        return 2
    except SafeTriageError as err:
        _report(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        _report("interrupted; nothing half-written was left")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
