"""Ablation: de-identification with vs without the prompt generator (backbone frozen).

Three test sets, each run without and with the prompt, same backbone, same run:
1. held-out simulated-patient pairs (identities never seen in training): motion transfer against
   the rendered ground truth (the synthetic person making the patient's motion): L1, PSNR;
2. held-out simulated-asymmetry clips (one-sided droop 0.6-1.0) through the whole `deid`
   pipeline and `evaluate-deid`: landmark-motion preservation, asymmetry agreement, privacy;
3. the shared real samples (driving.mp4 onto source.png) through the same two tools.
Prints one table and writes JSON.

  python experiments/prompt_ablation.py --backbone runs/normal/model --prompt runs/prompt/prompt
"""

import argparse
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from safetriage_jax import outputs
from safetriage_jax.data import synthetic_faces
from safetriage_jax.data.simulated_patients import PatientOptions, SimulatedPatients, TEST_SEED_OFFSET
from safetriage_jax.deid.evaluation import evaluate_deid
from safetriage_jax.deid.pipeline import DeidOptions, deidentify
from safetriage_jax.model_dir import load_model, load_prompt
from safetriage_jax.models.tpsmm import TPSMM
from safetriage_jax.train.prompt import prompt_both, transfer
from safetriage_jax.video import copy_first_frames, video_writer

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "samples"
CLIP_SIZE = 256  # rendered clips are large enough for dlib's landmarks


def pair_metrics(backbone_config, backbone, prompt, count, batch=8):
    """Transfer L1 / PSNR against the ground truth on held-out simulated pairs."""
    model = TPSMM(backbone_config)
    source = SimulatedPatients(PatientOptions(size=backbone_config.image_size), seed=0, split="test")

    @jax.jit
    def errors(images, params):
        if params is None:
            driving, reference = images["driving"], images["reference"]
        else:
            driving, reference, _, _ = prompt_both(params, prompt[0], images)
        prediction = transfer(model, backbone, images["identity"], reference, driving)
        l1 = jnp.mean(jnp.abs(prediction - images["target"]), axis=(1, 2, 3))
        mse = jnp.mean((jnp.clip(prediction, 0, 1) - images["target"]) ** 2, axis=(1, 2, 3))
        return l1, -10 * jnp.log10(mse)

    results = {"without": [], "with": []}
    for start in range(0, count, batch):
        examples = [source[i] for i in range(start, min(start + batch, count))]
        images = {k: jnp.asarray(np.stack([e[k] for e in examples]), jnp.float32) / 255
                  for k in examples[0]}
        results["without"].append(errors(images, None))
        results["with"].append(errors(images, prompt[1]))
    return {name: {"transfer_l1": float(np.mean(np.concatenate([r[0] for r in rows]))),
                   "transfer_psnr": float(np.mean(np.concatenate([r[1] for r in rows])))}
            for name, rows in results.items()}


def simulated_clip(index, folder, frames):
    """A held-out patient clip with a strong droop and a synthetic identity image."""
    rng = np.random.default_rng([TEST_SEED_OFFSET, 7, index])
    patient, identity = synthetic_faces.sample_identity(rng), synthetic_faces.sample_identity(rng)
    motion = synthetic_faces.sample_motion(rng, frames, asymmetry=rng.uniform(0.6, 1.0),
                                           blink_rate=1.0)
    video = folder / f"patient{index}.mp4"
    with video_writer(video, 25, CLIP_SIZE, CLIP_SIZE) as write:
        write(synthetic_faces.render(patient, motion, CLIP_SIZE))
    image = folder / f"identity{index}.png"
    still = synthetic_faces.sample_motion(rng, 1)  # a symmetric face at rest
    Image.fromarray(synthetic_faces.render(identity, still, CLIP_SIZE)[0]).save(image)
    return video, image


def deid_metrics(video, identity, backbone_dir, prompt_dir, folder, tag):
    out = folder / f"{tag}.mp4"
    summary = deidentify(video, identity, out, backbone_dir, prompt_dir=prompt_dir,
                         options=DeidOptions(batch_size=16), progress=False)
    metrics = evaluate_deid(video, out, folder / f"{tag}-report", identity_path=identity,
                            baselines=(), progress=False)["methods"]["deid"]
    asymmetry = metrics["asymmetry"]
    return {"blank_frames": summary["blank_frames"],
            "landmark_frames": metrics["motion"]["landmark_frames"],
            "landmark_r": metrics["motion"]["landmark_correlation"], "nme": metrics["motion"]["nme"],
            "blink_r": metrics["motion"]["blink_r"], "mouth_r": metrics["motion"]["mouth_r"],
            "mouth_corner_r": asymmetry["mouth_corner"]["pearson_r"],
            "eye_opening_r": asymmetry["eye_opening"]["pearson_r"],
            "reid_rate": metrics["privacy"]["reid_rate"]}


def mean_rows(rows):
    keys = rows[0].keys()
    values = {k: [r[k] for r in rows if r[k] is not None] for k in keys}
    return {k: (float(np.mean(v)) if v else None) for k, v in values.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="the frozen backbone model directory")
    parser.add_argument("--prompt", required=True, help="the trained prompt directory")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    backbone_config, backbone = load_model(args.backbone)
    prompt = load_prompt(args.prompt)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="prompt-ablation-"))

    results = {"pairs": pair_metrics(backbone_config, backbone, prompt, args.pairs)}
    clips = [simulated_clip(i, folder, args.frames) for i in range(args.clips)]
    for name, prompt_dir in (("without", None), ("with", args.prompt)):
        rows = [deid_metrics(v, im, args.backbone, prompt_dir, folder, f"{name}{i}")
                for i, (v, im) in enumerate(clips)]
        results.setdefault("clips", {})[name] = mean_rows(rows)
        sample = folder / "shared.mp4"
        copy_first_frames(SHARED / "driving.mp4", sample, args.frames)
        results.setdefault("shared", {})[name] = deid_metrics(
            sample, SHARED / "source.png", args.backbone, prompt_dir, folder, f"shared-{name}")

    print(f"\nprompt ablation: backbone {args.backbone} ({backbone_config.image_size}px), prompt "
          f"{args.prompt}, device {jax.devices()[0].device_kind}, {time.strftime('%Y-%m-%d')}, "
          f"{time.perf_counter() - start:.0f} s")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    print(f"{'test set':<34} {'prompt':<8} " + " ".join(
        f"{c:>10}" for c in ("L1", "PSNR", "lmk r", "NME", "blink r", "mouth r", "corner r",
                             "eye r", "re-id")))
    for name in ("without", "with"):
        p = results["pairs"][name]
        print(f"{f'simulated pairs ({args.pairs})':<34} {name:<8} {p['transfer_l1']:>10.4f} "
              f"{p['transfer_psnr']:>10.2f}" + " " * 77)
    for key, label in (("clips", f"simulated droop clips ({args.clips})"),
                       ("shared", "shared samples")):
        for name in ("without", "with"):
            r = results[key][name]
            print(f"{label:<34} {name:<8} {'':>10} {'':>10} " + " ".join(
                f"{fmt(r[k]):>10}" for k in ("landmark_r", "nme", "blink_r", "mouth_r",
                                              "mouth_corner_r", "eye_opening_r", "reid_rate")))
    if args.json:
        outputs.write_json(args.json, results, overwrite=True)


if __name__ == "__main__":
    main()
