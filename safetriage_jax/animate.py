"""Animating a source image with a driving video, many frames per device call.

The source's keypoints and encoder features are computed once per video; each batch of
driving frames is resized, animated and quantised to uint8 inside one jitted function, and
the next batch is dispatched before the previous one is encoded, so host I/O overlaps compute.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import ConvexHull
from tqdm.auto import tqdm

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.model_dir import load_model
from safetriage_jax.models import prompt as prompt_lib
from safetriage_jax.models.policy import Policy
from safetriage_jax.models.tpsmm import TPSMM
from safetriage_jax.video import VideoReader, read_image, video_writer

MODES = ("relative", "standard", "avd")
MAX_BATCH = 4096


def check_batch_size(batch_size):
    """Raises unless ``batch_size`` is an integer in [1, MAX_BATCH] (frames per device call)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not (
            1 <= batch_size <= MAX_BATCH):
        raise SafeTriageError(f"The batch size must be an integer from 1 to {MAX_BATCH} "
                              f"(got {batch_size!r}).")


def to_model_input(images_NHW3_uint8, size):
    """uint8 frames of any size -> (N, size, size, 3) float32 in [0, 1] (antialiased resize)."""
    images = images_NHW3_uint8.astype(jnp.float32) / 255.0
    return jax.image.resize(images, (images.shape[0], size, size, 3), "linear", antialias=True)


def hull_area(kp_N2):
    """Area of the keypoints' convex hull (0 for degenerate sets)."""
    try:
        return ConvexHull(np.asarray(kp_N2, np.float64)).volume
    except Exception:  # scipy raises QhullError for collinear / duplicate points
        return 0.0


def relative_keypoints(kp_source_1N2, kp_driving_BN2, kp_initial_1N2, movement_scale):
    """Source keypoints moved by the driving motion since its first frame, rescaled."""
    return kp_source_1N2 + (kp_driving_BN2 - kp_initial_1N2) * movement_scale


class Animator:
    """Holds a model and one source image; animates batches of driving frames.

    With ``prompt=(PromptConfig, params)`` every driving frame, the reference (first) frame
    included, gets its generated prompt before the backbone reads its keypoints. ``precision``
    is the networks' compute dtype and ``warp_implementation`` their warp backend
    (``models.policy``); the output frames are uint8 either way.
    """

    def __init__(self, config, variables, mode="relative", prompt=None, precision="float32",
                 warp_implementation=None):
        if mode not in MODES:
            raise SafeTriageError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
        if mode == "avd" and "avd_network" not in variables["params"]:
            raise SafeTriageError("This checkpoint has no AVD network; use the relative or the "
                                  "standard mode.")
        self.config, self.variables, self.mode = config, variables, mode
        self.prompt_config, self.prompt_params = prompt if prompt is not None else (None, None)
        self.model = TPSMM(config, Policy(precision, warp_implementation=warp_implementation))
        self._prepare = jax.jit(self._prepare_impl)
        self._keypoints = jax.jit(self._keypoints_impl)
        self._reference = jax.jit(self._reference_impl)
        self._animate = jax.jit(self._animate_impl)

    def _keypoints_impl(self, variables, images_NHW3_uint8):
        images = to_model_input(images_NHW3_uint8, self.config.image_size)
        return self.model.apply(variables, images, method=TPSMM.keypoints)

    def _prepare_impl(self, variables, source_1HW3_uint8):
        source = to_model_input(source_1HW3_uint8, self.config.image_size)
        kp_source = self.model.apply(variables, source, method=TPSMM.keypoints)
        features = self.model.apply(variables, source, method=TPSMM.encode_source)
        return source, kp_source, features

    def _driving_keypoints(self, variables, prompt_params, frames_NHW3_uint8, reference, source):
        """Keypoints of driving frames, prompted first when there is a prompt generator."""
        driving = to_model_input(frames_NHW3_uint8, self.config.image_size)
        if self.prompt_config is not None:
            driving, _ = prompt_lib.prompted(prompt_params, self.prompt_config, driving,
                                             reference, source)
        return self.model.apply(variables, driving, method=TPSMM.keypoints)

    def _reference_impl(self, variables, prompt_params, reference_1HW3_uint8, source):
        reference = to_model_input(reference_1HW3_uint8, self.config.image_size)
        return reference, self._driving_keypoints(variables, prompt_params, reference_1HW3_uint8,
                                                  reference, source)

    def _animate_impl(self, variables, prompt_params, state, frames_NHW3_uint8):
        source, kp_source, features, kp_initial, movement_scale, reference = state
        batch = frames_NHW3_uint8.shape[0]
        kp_driving = self._driving_keypoints(variables, prompt_params, frames_NHW3_uint8,
                                             reference, source)
        kp_source_b = jnp.broadcast_to(kp_source, (batch,) + kp_source.shape[1:])
        if self.mode == "standard":
            kp_target = kp_driving
        elif self.mode == "relative":
            kp_target = relative_keypoints(kp_source, kp_driving, kp_initial, movement_scale)
        else:
            kp_target = self.model.apply(variables, kp_source_b, kp_driving, method=TPSMM.avd)
        motion = self.model.apply(variables, source, kp_target, kp_source_b,
                                  method=TPSMM.dense_motion)
        out = self.model.apply(variables, features, source, motion, method=TPSMM.decode)
        prediction = out["prediction"].astype(jnp.float32)  # quantise from float32
        return jnp.round(jnp.clip(prediction, 0, 1) * 255).astype(jnp.uint8)

    def set_source(self, source_HW3_uint8, first_driving_HW3_uint8):
        """Caches everything that depends only on the source and the first driving frame."""
        source, kp_source, features = self._prepare(self.variables, source_HW3_uint8[None])
        reference, kp_initial = self._reference(self.variables, self.prompt_params,
                                                first_driving_HW3_uint8[None], source)
        area_source, area_initial = hull_area(kp_source[0]), hull_area(kp_initial[0])
        scale = np.sqrt(area_source) / np.sqrt(area_initial) if area_initial > 0 else 1.0
        self._state = (source, kp_source, features, kp_initial, jnp.float32(scale), reference)

    def keypoints(self, frames_NHW3_uint8):
        """(N, K*5, 2) keypoints of uint8 frames (any size; resized to the model's)."""
        return self._keypoints(self.variables, frames_NHW3_uint8)

    def animate(self, frames_NHW3_uint8):
        """Dispatches one batch (asynchronously); returns a device array of uint8 frames."""
        return self._animate(self.variables, self.prompt_params, self._state, frames_NHW3_uint8)


def batches(frames, batch_size):
    """Groups frames into (batch_size, H, W, 3) arrays, padding the last by repetition.

    Yields (array, number of real frames) so every device call has the same shape.
    """
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == batch_size:
            yield np.stack(chunk), batch_size
            chunk = []
    if chunk:
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        yield np.stack(chunk), real


def animate_video(model_dir, source_path, driving_path, out_path, *, mode="relative",
                  batch_size=16, warp_implementation=None, precision="float32", overwrite=False,
                  progress=True):
    """Writes ``out_path`` (h264 mp4 at the driving video's fps); returns the frame count.

    ``overwrite``: replace an existing video at ``out_path`` (never one of the inputs)."""
    check_batch_size(batch_size)
    inputs = (model_dir, source_path, driving_path)
    outputs.check_output(out_path, "video", inputs=inputs, overwrite=overwrite)
    config, variables = load_model(model_dir)
    animator = Animator(config, variables, mode, precision=precision,
                        warp_implementation=warp_implementation)
    source = read_image(source_path)
    size = config.image_size
    with VideoReader(driving_path) as reader:
        frames = iter(reader)
        first = next(frames)
        animator.set_source(source, first)
        bar = tqdm(total=reader.num_frames, unit="frame", desc="animate", disable=not progress)
        written = 0
        with video_writer(out_path, reader.fps, size, size, overwrite=overwrite,
                          inputs=inputs) as write:
            pending = None
            for batch, real in batches(itertools.chain([first], frames), batch_size):
                result = animator.animate(batch)
                if pending is not None:
                    written += _flush(write, pending, bar)
                pending = (result, real)
            written += _flush(write, pending, bar)
        bar.close()
    return written


def _flush(write, pending, bar):
    result, real = pending
    frames = np.asarray(result)[:real]
    write(frames)
    bar.update(real)
    return real
