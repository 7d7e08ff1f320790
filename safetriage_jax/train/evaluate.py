"""Held-out evaluation of a backbone: video reconstruction as upstream measures it, and, on the
synthetic dataset, motion transfer against rendered ground truth.

- reconstruction (standard mode, each test clip's frame 0 animated by the whole clip):
  L1 (pixels in [0, 1]) and AKD (mean keypoint distance in pixels between driving and
  predicted frames, keypoints from the model's own detector: a self-consistency measure);
- transfer (synthetic only; relative mode): identity B, posed as clip A's frame 0, animated by
  clip A; compared with B rendered making A's motion: L1, PSNR and SSIM (dm-pix).
"""

import dm_pix as pix
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from safetriage_jax.animate import Animator, batches


def _animate(animator, source_HW3, frames_THW3, batch_size):
    """All frames animated in padded batches (one compiled shape); (T, H, W, 3) uint8."""
    animator.set_source(source_HW3, frames_THW3[0])
    out = [np.asarray(animator.animate(chunk))[:real]
           for chunk, real in batches(frames_THW3, batch_size)]
    return np.concatenate(out)


def _to_unit(frames_uint8):
    return jnp.asarray(frames_uint8, jnp.float32) / 255.0


def reconstruction(animator, video_THW3, batch_size):
    predicted = _animate(animator, video_THW3[0], video_THW3, batch_size)
    l1 = float(np.mean(np.abs(predicted.astype(np.float32) - video_THW3) / 255.0))
    size = video_THW3.shape[1]
    kp_real = np.asarray(animator.keypoints(video_THW3))
    kp_fake = np.asarray(animator.keypoints(predicted))
    akd = float(np.mean(np.linalg.norm(kp_real - kp_fake, axis=-1)) * (size - 1) / 2)
    return {"reconstruction_l1": l1, "akd_px": akd}


def transfer(animator, identity_b, motion_a, video_a_THW3, batch_size):
    """Motion of clip A onto identity B, scored against B rendered with A's motion."""
    from safetriage_jax.data import synthetic_faces
    size = video_a_THW3.shape[1]
    truth = synthetic_faces.render(identity_b, motion_a, size)
    predicted = _animate(animator, truth[0], video_a_THW3, batch_size)
    pred, real = _to_unit(predicted), _to_unit(truth)
    return {"transfer_l1": float(jnp.mean(jnp.abs(pred - real))),
            "transfer_psnr": float(jnp.mean(pix.psnr(pred, real))),
            "transfer_ssim": float(jnp.mean(pix.ssim(pred, real)))}


class Evaluator:
    """Held-out metrics for any variables of one model config (compiled once, reused)."""

    def __init__(self, model_config, variables, batch_size=16, warp_implementation=None):
        self.batch_size = batch_size
        self.standard = Animator(model_config, variables, mode="standard",
                                 warp_implementation=warp_implementation)
        self.relative = Animator(model_config, variables, mode="relative",
                                 warp_implementation=warp_implementation)

    def __call__(self, variables, clips, *, num_clips=16, progress=True):
        """Mean metrics over the first ``num_clips`` clips of a tfds data source."""
        from safetriage_jax.data import builders, synthetic_faces
        self.standard.variables = self.relative.variables = variables
        num_clips = min(num_clips, len(clips))
        records = [clips[i] for i in range(num_clips)]
        results = []
        for i, record in enumerate(tqdm(records, desc="evaluate", unit="clip",
                                        disable=not progress)):
            video = np.asarray(record["video"])
            metrics = reconstruction(self.standard, video, self.batch_size)
            if "identity_seed" in record and num_clips > 1:
                partner = records[(i + 1) % num_clips]  # another clip, usually another identity
                identity_b = synthetic_faces.sample_identity(
                    np.random.default_rng(int(partner["identity_seed"])))
                metrics.update(transfer(self.relative, identity_b,
                                        builders.motion_dict(record["motion"]), video,
                                        self.batch_size))
            results.append(metrics)
        means = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
        return means | {"num_clips": num_clips}


def evaluate(model_config, variables, clips, *, num_clips=16, batch_size=16, progress=True,
             warp_implementation=None):
    """Mean held-out metrics of one model (see :class:`Evaluator`)."""
    evaluator = Evaluator(model_config, variables, batch_size, warp_implementation)
    return evaluator(variables, clips, num_clips=num_clips, progress=progress)


def evaluate_model_directory(config, model_dir, *, split="test", num_clips=None, progress=True):
    """Mean held-out metrics of the model in ``model_dir`` on ``config``'s dataset (a training
    ConfigDict); the model must run at the resolution of the dataset's clips."""
    from safetriage_jax.model_dir import load_model
    from safetriage_jax.errors import SafeTriageError
    from safetriage_jax.train.backbone import open_dataset
    model_config, variables = load_model(model_dir)
    if model_config.image_size != config.data.size:
        raise SafeTriageError(f"The model in {model_dir} runs at {model_config.image_size} px but "
                              f"the config's clips are {config.data.size} px; evaluate it with "
                              "the config it was trained with.")
    clips, _ = open_dataset(config, split)
    return evaluate(model_config, variables, clips, num_clips=num_clips or config.eval.num_clips,
                    batch_size=config.eval.batch_size, progress=progress,
                    warp_implementation=config.train.warp_implementation)
