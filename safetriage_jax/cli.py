"""The ``safetriage`` command line: a thin layer over the library; errors print without traceback."""

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

from safetriage_jax.errors import SafeTriageError

DEMO_FIXTURE = pathlib.Path("fixtures", "tpsmm_small")
DEMO_SAMPLES = pathlib.Path("samples")
DEFAULT_CHECKPOINT = "models/vox"


def _config_for(args, image_size=None):
    from safetriage_jax.models.config import load_model_config
    config = load_model_config(args.config, image_size=args.image_size)
    size = image_size or args.image_size
    return dataclasses.replace(config, image_size=size) if size else config


def _load_weights(checkpoint, config_spec_args, image_size=None):
    """(config, variables) from a model directory or an upstream .pth.tar + config."""
    from safetriage_jax import checkpoint as ckpt
    from safetriage_jax.porting import port_checkpoint
    path = pathlib.Path(checkpoint)
    if path.is_dir():
        config, variables = ckpt.load_model(path)
        if image_size:
            config = dataclasses.replace(config, image_size=image_size)
        return config, variables
    if not config_spec_args.config:
        raise SafeTriageError("--config is needed with an upstream .pth.tar checkpoint (e.g. "
                              "config/vox-256.yaml).")
    config = _config_for(config_spec_args, image_size)
    return config, port_checkpoint(path, config)


def cmd_port_weights(args):
    from safetriage_jax.checkpoint import save_model
    from safetriage_jax.porting import port_checkpoint
    config = _config_for(args)
    variables = port_checkpoint(args.checkpoint, config)
    out = save_model(args.out, config, variables, safetensors=args.safetensors,
                     overwrite=args.overwrite)
    print(f"Ported {args.checkpoint} -> {out} (image size {config.image_size}, "
          f"num_tps {config.num_tps}).")


def cmd_export_weights(args):
    from safetriage_jax.checkpoint import load_model
    from safetriage_jax.porting import export_checkpoint
    _, variables = load_model(args.checkpoint)
    export_checkpoint(variables, args.out)
    print(f"Wrote upstream-layout checkpoint {args.out}.")


def cmd_parity(args):
    import numpy as np

    from safetriage_jax.parity import compare, parity_outputs
    inputs_path = pathlib.Path(args.inputs)
    if not inputs_path.is_file():
        raise SafeTriageError(f"Inputs file {inputs_path} does not exist.")
    try:
        inputs = dict(np.load(inputs_path))
    except Exception as err:
        raise SafeTriageError(f"Could not read {inputs_path} as .npz ({err}).") from None
    for key in ("source", "driving"):
        if key not in inputs or inputs[key].ndim != 4 or inputs[key].shape[1] != 3:
            raise SafeTriageError(f"{inputs_path} needs '{key}' frames shaped (N, 3, H, W) in [0, 1].")
    config, variables = _load_weights(args.checkpoint, args, image_size=inputs["source"].shape[2])
    outputs = parity_outputs(config, variables, inputs["source"], inputs["driving"])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **outputs)
    pathlib.Path(tmp.name).replace(out)
    print(f"Wrote {len(outputs)} outputs to {out}.")
    errors = compare(outputs, inputs)
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
                           batch_size=args.batch, warp_implementation=args.warp_implementation)
    seconds = time.perf_counter() - start
    print(f"Wrote {args.out}: {frames} frames in {seconds:.1f} s ({frames / seconds:.1f} frames/s, "
          "compilation included).")


def _find_shared(explicit):
    candidates = [explicit] if explicit else [
        os.environ.get("SAFETRIAGE_SHARED"), "../shared", "shared",
        pathlib.Path(__file__).resolve().parents[2] / "shared"]
    for candidate in filter(None, candidates):
        if (pathlib.Path(candidate) / DEMO_FIXTURE / "checkpoint.pth.tar").is_file():
            return pathlib.Path(candidate)
    raise SafeTriageError("Could not find the shared demo data (fixtures/tpsmm_small and samples/); "
                          "pass --shared DIR or set SAFETRIAGE_SHARED.")


def cmd_demo(args):
    from safetriage_jax.animate import animate_video
    from safetriage_jax.checkpoint import save_model
    from safetriage_jax.models.config import from_upstream_yaml
    from safetriage_jax.porting import port_checkpoint
    shared = _find_shared(args.shared)
    out_dir = pathlib.Path(args.out)
    model_dir = out_dir / "model"
    print("Demo: RANDOM weights (the shared parity fixture's checkpoint), so the face will not look "
          "real; real weights come from `safetriage port-weights --checkpoint vox.pth.tar`.")
    if not (model_dir / "config.json").is_file():
        config = from_upstream_yaml(shared / DEMO_FIXTURE / "config.yaml")
        variables = port_checkpoint(shared / DEMO_FIXTURE / "checkpoint.pth.tar", config)
        save_model(model_dir, config, variables)
        print(f"Ported the fixture checkpoint to {model_dir}.")
    out = out_dir / "animation.mp4"
    start = time.perf_counter()
    frames = animate_video(model_dir, shared / DEMO_SAMPLES / "source.png",
                           shared / DEMO_SAMPLES / "driving.mp4", out, mode=args.mode,
                           batch_size=args.batch)
    print(f"Wrote {out}: {frames} frames in {time.perf_counter() - start:.1f} s.")
    from safetriage_jax.deid.evaluation import evaluate_deid
    from safetriage_jax.deid.pipeline import DeidOptions, deidentify
    driving, source = shared / DEMO_SAMPLES / "driving.mp4", shared / DEMO_SAMPLES / "source.png"
    deid = out_dir / "deid.mp4"
    summary = deidentify(driving, source, deid, model_dir,
                         options=DeidOptions(paste_back=True, batch_size=args.batch))
    print(f"Wrote {deid}: {summary['frames']} frames de-identified (face pasted back) in "
          f"{summary['seconds']:.1f} s.")
    evaluate_deid(driving, deid, out_dir / "report", identity_path=source, stride=3)
    print(f"Wrote the evaluation report {out_dir / 'report' / 'report.html'} (every 3rd frame).")


def _run_training(args, train_fn, what, result, hint=""):
    """Shared by `train` and `train-prompt`: multi-host set-up, a persistent compilation cache,
    the config, the run, and a one-line result."""
    import jax
    from safetriage_jax.models.config import load_python_config
    from safetriage_jax.train import distributed
    distributed.initialize(distributed.launch_settings(
        args.coordinator_address, args.num_processes, args.process_id), auto=args.distributed)
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
    from safetriage_jax.train.loop import train
    _run_training(args, train, "the backbone", "model")


def cmd_train_prompt(args):
    from safetriage_jax.train.prompt import train_prompt
    _run_training(args, train_prompt, "the prompt generator", "prompt",
                  " (use it with `safetriage deid --prompt-checkpoint`)")


def cmd_evaluate(args):
    import json
    from safetriage_jax.checkpoint import load_model
    from safetriage_jax.models.config import load_python_config
    from safetriage_jax.train.evaluate import evaluate
    from safetriage_jax.train.loop import open_dataset
    config = load_python_config(args.config)
    model_config, variables = load_model(
        args.model, warp_implementation=config.model.get("warp_implementation"))
    clips, _ = open_dataset(config, args.split)
    metrics = evaluate(model_config, variables, clips, num_clips=args.num_clips or
                       config.eval.num_clips, batch_size=config.eval.batch_size)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def cmd_deid(args):
    from safetriage_jax.deid.framing import FramingOptions
    from safetriage_jax.deid.pipeline import DeidOptions, deidentify
    checkpoint = args.checkpoint or os.environ.get("SAFETRIAGE_CHECKPOINT", DEFAULT_CHECKPOINT)
    if not pathlib.Path(checkpoint).is_dir():
        raise SafeTriageError(f"No model directory at {checkpoint}. Port upstream's pretrained "
                              "weights once: `safetriage port-weights --checkpoint vox.pth.tar "
                              f"--config vox-256 --out {DEFAULT_CHECKPOINT}` (or pass --checkpoint).")
    options = DeidOptions(mode=args.mode, reference=args.reference, paste_back=args.paste_back,
                          detector=args.detector, keep_audio=args.keep_audio,
                          batch_size=args.batch, warp_implementation=args.warp_implementation,
                          framing=FramingOptions(scale=args.crop_scale))
    summary = deidentify(args.input, args.identity, args.out, checkpoint, options=options,
                         prompt_dir=args.prompt_checkpoint, report_dir=args.report)
    print(f"Wrote {args.out}: {summary['frames']} frames ({summary['face_frames']} with the face "
          f"found, {summary['filled_frames']} filled between detections, "
          f"{summary['blank_frames']} blanked) in {summary['seconds']:.1f} s "
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
                            max_frames=args.max_frames, stride=args.stride)
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
    parser = argparse.ArgumentParser(prog="safetriage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config(p, required):
        p.add_argument("--config", required=required,
                       help="upstream YAML (vox-256.yaml), configs/tpsmm.py[:variant] or a preset name")
        p.add_argument("--image-size", type=int, default=None,
                       help="model resolution (default: from the config name, else 256)")

    p = sub.add_parser("port-weights", help="upstream .pth.tar -> Flax model directory (orbax)")
    p.add_argument("--checkpoint", required=True, help="upstream checkpoint, e.g. vox.pth.tar")
    add_config(p, required=True)
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--safetensors", action="store_true", help="also write model.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_port_weights)

    p = sub.add_parser("export-weights", help="Flax model directory -> upstream-layout .pth.tar")
    p.add_argument("--checkpoint", required=True, help="model directory")
    p.add_argument("--out", required=True, help="the .pth.tar to write")
    p.set_defaults(func=cmd_export_weights)

    p = sub.add_parser("parity", help="run every network on an npz's frames, upstream layout")
    p.add_argument("--checkpoint", required=True, help="upstream .pth.tar or model directory")
    add_config(p, required=False)
    p.add_argument("--inputs", required=True, help="npz with source and driving (N,3,H,W) in [0,1]")
    p.add_argument("--out", required=True, help="npz to write the outputs to")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max relative error when --inputs also holds expected outputs")
    p.set_defaults(func=cmd_parity)

    def add_animation_options(p):
        p.add_argument("--mode", default="relative", choices=["relative", "standard", "avd"])
        p.add_argument("--batch", type=int, default=16, help="driving frames per device call")

    p = sub.add_parser("animate", help="animate a source image with a driving video")
    p.add_argument("--checkpoint", required=True, help="model directory from port-weights")
    p.add_argument("--source", required=True, help="source image (png/jpg)")
    p.add_argument("--driving", required=True, help="driving video")
    p.add_argument("--out", required=True, help="output mp4 (h264)")
    add_animation_options(p)
    p.add_argument("--warp-implementation", default=None, help="grid-sample backend (default: best)")
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
    p.add_argument("--num-clips", type=int, default=0, help="default: the config's eval.num_clips")
    p.add_argument("--out", default=None, help="also write the metrics as JSON here")
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
    p.add_argument("--crop-scale", type=float, default=1.8, help="crop side / face box side")
    p.add_argument("--keep-audio", action="store_true",
                   help="copy the input's audio (re-encoded AAC); dropped by default: voices identify")
    p.add_argument("--detector", default="hog", choices=["hog", "centerface"],
                   help="face detector: dlib HOG (default) or CenterFace (extra `centerface`)")
    add_animation_options(p)
    p.add_argument("--warp-implementation", default=None, help="grid-sample backend (default: best)")
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
    p.add_argument("--max-frames", type=int, default=None, help="evaluate at most this many frames")
    p.add_argument("--stride", type=int, default=1, help="evaluate every n-th frame")
    p.set_defaults(func=cmd_evaluate_deid)

    p = sub.add_parser("demo", help="port the shared fixture; animate and de-identify the shared "
                                    "samples, with the evaluation report")
    p.add_argument("--shared", default=None, help="the shared/ folder (default: ../shared)")
    p.add_argument("--out", default="out/demo", help="where to write the model and the video")
    add_animation_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SafeTriageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
