"""tensorflow-datasets builders for face videos, stored as uint8 clips in array_record (no TensorFlow).

Two builders share one record layout (``video`` (T, S, S, 3) uint8, ``identity``, ``clip``):
- ``synthetic_talking_faces``: procedurally rendered faces (no download; the embedded default),
  whose records also carry the ground-truth motion and landmarks;
- ``face_video_folder``: a local VoxCeleb-style folder of clips (mp4/mov/avi/webm/gif files or
  folders of frames), the identity being the name before ``#`` as in upstream TPSMM's datasets.
"""

import dataclasses
import hashlib
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from safetriage_jax.data import synthetic_faces
from safetriage_jax.errors import SafeTriageError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".webm", ".mkv", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def clip_features(size, extra=None):
    """The record layout common to both builders (plus builder-specific ``extra`` features)."""
    features = {
        "video": tfds.features.Tensor(shape=(None, size, size, 3), dtype=np.uint8),
        "identity": tfds.features.Text(),
        "clip": tfds.features.Text(),
    }
    features.update(extra or {})
    return tfds.features.FeaturesDict(features)


@dataclasses.dataclass
class SyntheticFacesConfig(tfds.core.BuilderConfig):
    """How many identities/clips/frames to render, at what size; ``asymmetric_fraction`` of the
    clips get a unilateral droop (strength drawn in [0.3, 1])."""

    size: int = 64
    train_identities: int = 48
    test_identities: int = 8
    clips_per_identity: int = 3
    frames_per_clip: int = 32
    asymmetric_fraction: float = 0.25
    seed: int = 0


def synthetic_config(**kwargs) -> SyntheticFacesConfig:
    """A :class:`SyntheticFacesConfig` named after its values, so different settings never share files."""
    config = SyntheticFacesConfig(name="tmp", **kwargs)
    fields = dataclasses.asdict(config)
    name = "_".join(f"{key}{fields[key]}" for key in
                    ("size", "train_identities", "test_identities", "clips_per_identity",
                     "frames_per_clip", "asymmetric_fraction", "seed"))
    return dataclasses.replace(config, name=name.replace(".", "p"))


class SyntheticTalkingFaces(tfds.core.GeneratorBasedBuilder):
    """Procedural talking faces; test identities never appear in train."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [synthetic_config()]

    def _info(self):
        cfg = self.builder_config
        return tfds.core.DatasetInfo(builder=self, features=clip_features(cfg.size, {
            "identity_seed": np.int64,
            "motion": tfds.features.Tensor(
                shape=(None, len(synthetic_faces.MOTION_KEYS)), dtype=np.float32),
            "landmarks": tfds.features.Tensor(
                shape=(None, synthetic_faces.NUM_LANDMARKS, 2), dtype=np.float32),
        }))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {"train": self._generate_examples(0, cfg.train_identities),
                "test": self._generate_examples(cfg.train_identities, cfg.test_identities)}

    def _generate_examples(self, first_identity, num_identities):
        cfg = self.builder_config
        for person in range(first_identity, first_identity + num_identities):
            identity_seed = cfg.seed * 1_000_003 + person
            identity = synthetic_faces.sample_identity(np.random.default_rng(identity_seed))
            for clip in range(cfg.clips_per_identity):
                rng = np.random.default_rng([identity_seed, clip])
                asymmetry = rng.uniform(0.3, 1.0) if rng.random() < cfg.asymmetric_fraction else 0.0
                motion = synthetic_faces.sample_motion(rng, cfg.frames_per_clip,
                                                       asymmetry=asymmetry)
                key = f"person{person:05d}#clip{clip:03d}"
                yield key, {
                    "video": synthetic_faces.render(identity, motion, cfg.size),
                    "identity": f"person{person:05d}",
                    "clip": key,
                    "identity_seed": identity_seed,
                    "motion": motion_array(motion),
                    "landmarks": synthetic_faces.landmarks(identity, motion),
                }


def motion_array(motion) -> np.ndarray:
    """(T, M) float32 in ``MOTION_KEYS`` order, the stored form of a motion dict."""
    return np.stack([motion[key] for key in synthetic_faces.MOTION_KEYS], -1).astype(np.float32)


def motion_dict(motion_TM) -> dict:
    """Inverse of :func:`motion_array`."""
    return {key: np.asarray(motion_TM[:, i]) for i, key in enumerate(synthetic_faces.MOTION_KEYS)}


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    """Frames are resized to ``size`` x ``size``; clips are cut to ``max_frames``;
    without train/ and test/ subfolders, ``test_fraction`` of the identities are held out."""

    size: int = 256
    max_frames: int = 300
    test_fraction: float = 0.2
    seed: int = 0


class FaceVideoFolder(tfds.core.GeneratorBasedBuilder):
    """A local folder of face clips (pass it as ``manual_dir``)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [FolderConfig(name="256", size=256)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the folder of clips as manual_dir: either train/ and test/ subfolders or one flat "
        "folder; each clip is a video file or a folder of frames named '<identity>#<clip>'.")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=clip_features(self.builder_config.size))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(clips)
                for split, clips in split_clips(dl_manager.manual_dir, self.builder_config).items()}

    def _generate_examples(self, clips):
        cfg = self.builder_config
        for path in clips:
            frames = read_clip(path, cfg.size, cfg.max_frames)
            yield path.name, {"video": frames, "identity": identity_of(path), "clip": path.name}


def identity_of(path) -> str:
    """VoxCeleb naming: 'id10001#abc#0001.mp4' belongs to identity 'id10001'."""
    name = pathlib.Path(path).name
    return name.split("#")[0] if "#" in name else pathlib.Path(path).stem


def list_clips(folder) -> list:
    folder = pathlib.Path(folder)
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (
        p.suffix.lower() in VIDEO_SUFFIXES or p.is_dir()))


def split_clips(folder, cfg: FolderConfig) -> dict:
    """{'train': [...], 'test': [...]} clip paths; a random split holds out whole identities."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise SafeTriageError(f"Dataset folder {folder} does not exist; pass the folder of face "
                              "clips (data.folder in the config).")
    if (folder / "train").is_dir():
        splits = {"train": list_clips(folder / "train")}
        if (folder / "test").is_dir():
            splits["test"] = list_clips(folder / "test")
    else:
        clips = list_clips(folder)
        identities = sorted({identity_of(p) for p in clips})
        rng = np.random.default_rng(cfg.seed)
        num_test = int(round(cfg.test_fraction * len(identities))) if len(identities) > 1 else 0
        held_out = set(rng.permutation(identities)[:num_test].tolist())
        splits = {"train": [p for p in clips if identity_of(p) not in held_out],
                  "test": [p for p in clips if identity_of(p) in held_out]}
    if not splits["train"]:
        raise SafeTriageError(f"{folder} holds no clips (video files {', '.join(VIDEO_SUFFIXES)} "
                              "or folders of frames).")
    return {split: clips for split, clips in splits.items() if clips}


def read_clip(path, size, max_frames) -> np.ndarray:
    """(T, size, size, 3) uint8 frames of one clip, resized with antialiasing."""
    from safetriage_jax.video import VideoReader
    path = pathlib.Path(path)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        frames = (np.asarray(Image.open(p).convert("RGB")) for p in images[:max_frames])
    else:
        reader = VideoReader(path)
        frames = (frame for _, frame in zip(range(max_frames), reader))
    resized = [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames]
    if not resized:
        raise SafeTriageError(f"Clip {path} has no frames.")
    return np.stack(resized)


def build(builder_name, data_dir, *, manual_dir=None, **config) -> tfds.core.DatasetBuilder:
    """Builds (once; later calls reuse the files) and returns a prepared builder."""
    if builder_name == "synthetic":
        builder = SyntheticTalkingFaces(config=synthetic_config(**config), data_dir=data_dir,
                                        file_format="array_record")
        builder.download_and_prepare()
    elif builder_name == "folder":
        if manual_dir is None:
            raise SafeTriageError("The folder dataset needs data.folder: the folder of face clips.")
        folder_id = hashlib.sha1(str(pathlib.Path(manual_dir).resolve()).encode()).hexdigest()[:10]
        folder_config = FolderConfig(name=f"s{config.get('size', 256)}_{folder_id}", **config)
        split_clips(manual_dir, folder_config)  # clear errors before tfds starts writing
        builder = FaceVideoFolder(config=folder_config, data_dir=data_dir,
                                  file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    else:
        raise SafeTriageError(f"Unknown dataset builder {builder_name!r}; use 'synthetic' or 'folder'.")
    return builder
