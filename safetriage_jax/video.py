"""Image and video I/O (Pillow, PyAV): clear errors on bad files, atomic writes."""

import contextlib
import fractions
import re
import warnings

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.inputs import require_file

MIN_SIDE = 32  # smaller inputs cannot carry a usable face
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused before decoding (an 8K photo is 33 MP)
MAX_VIDEO_SIDE = 8192  # video frames up to 8K
TRUNCATION_SLACK = 0.02  # decoded frames may fall this far (and 2 frames) short of the header


def _check_size(width, height, what):
    if min(width, height) < MIN_SIDE:
        raise SafeTriageError(f"{what} is {width}x{height} px; at least {MIN_SIDE}x{MIN_SIDE} is "
                              "needed. Use a larger image or video.")


def read_image(path):
    """(H, W, 3) uint8 RGB from any image Pillow reads (alpha dropped, greyscale expanded)."""
    path = require_file(path, "Image")
    try:
        with warnings.catch_warnings():  # Pillow warns of large images; the check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise SafeTriageError(
                        f"Image {path} is {width}x{height} px ({width * height / 1e6:.0f} MP); at "
                        f"most {MAX_IMAGE_PIXELS / 1e6:.0f} MP is read. Scale it down first.")
                rgb = _to_rgb8(image)
    except Image.DecompressionBombError as err:  # a header claiming over 2x Pillow's limit
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        size = f" (its header claims {int(claimed.group(1)) / 1e6:.0f} MP)" if claimed else ""
        raise SafeTriageError(f"Image {path} is too large{size}; at most "
                              f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP is read. Scale it down first.") from None
    except (UnidentifiedImageError, OSError) as err:
        raise SafeTriageError(f"Could not read {path} as an image ({err}); pass a PNG or JPEG.") from None
    _check_size(rgb.shape[1], rgb.shape[0], f"Image {path}")
    return rgb


def _to_rgb8(image):
    """uint8 RGB by bit depth: 16-bit (and 32-bit integer) greyscale is scaled, not clipped."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit PNGs, whose white is 65535
        grey = np.asarray(image).astype(np.float64)
        peak = 65535.0 if grey.max(initial=0) <= 65535 else float(np.iinfo(np.int32).max)
        grey = np.round(np.clip(grey, 0, peak) * (255.0 / peak)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode == "F":  # float greyscale: [0, 1]
        grey = np.round(np.clip(np.asarray(image), 0, 1) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


class VideoReader:
    """Decodes the first video stream of a file as (H, W, 3) uint8 RGB frames."""

    def __init__(self, path):
        self.path = require_file(path, "Video")
        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, UnicodeDecodeError) as err:
            raise SafeTriageError(f"Could not open {self.path} as a video ({err}); is it a complete "
                                  "mp4/avi/mov/webm file?") from None
        if not self._container.streams.video:
            self._container.close()
            raise SafeTriageError(f"{self.path} has no video stream.")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        _check_size(self._stream.width, self._stream.height, f"Video {self.path}")
        if max(self._stream.width, self._stream.height) > MAX_VIDEO_SIDE:
            self._container.close()
            raise SafeTriageError(f"Video {self.path} is {self._stream.width}x"
                                  f"{self._stream.height} px; at most {MAX_VIDEO_SIDE} px a side "
                                  "is read. Scale it down first.")

    @property
    def fps(self) -> fractions.Fraction:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return fractions.Fraction(rate) if rate else fractions.Fraction(25)

    @property
    def num_frames(self):
        """Frame count from the container header, else from its duration (None when neither)."""
        if self._stream.frames:
            return self._stream.frames
        if self._stream.duration and self._stream.time_base:
            return round(float(self._stream.duration * self._stream.time_base * self.fps)) or None
        return None

    def __iter__(self):
        count = 0
        try:
            for frame in self._container.decode(self._stream):
                count += 1
                image = frame.to_ndarray(format="rgb24")
                quarter_turns = round(frame.rotation / 90) % 4  # phones store portrait sideways
                yield np.rot90(image, quarter_turns).copy() if quarter_turns else image
        except av.error.FFmpegError as err:
            raise SafeTriageError(f"{self.path} is corrupt: decoding failed after {count} frames "
                                  f"({err}).") from None
        if count == 0:
            raise SafeTriageError(f"{self.path} has no decodable video frames.")
        expected = self.num_frames
        if expected and count < expected * (1 - TRUNCATION_SLACK) - 2:
            raise SafeTriageError(f"{self.path} is truncated or damaged: its header announces "
                                  f"{expected} frames but only {count} could be decoded. Use the "
                                  "complete file.")

    def close(self):
        self._container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def video_writer(path, fps, width, height, crf=18, audio_from=None, *, overwrite=False, inputs=()):
    """Yields ``write(frames_NHW3_uint8)``; the h264 mp4 appears at ``path`` only on success.

    Only the video stream is written, unless ``audio_from`` names a file whose first audio track
    is then re-encoded as AAC alongside; no metadata is copied from anywhere. h264 needs even
    sides, so an odd width or height gets one replicated column or row. ``overwrite`` and
    ``inputs``: as for :func:`safetriage_jax.outputs.check_output` (an existing video only).
    """
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    width, height = width + width % 2, height + height % 2
    inputs = (*inputs, audio_from)
    with outputs.atomic_file(path, "video", overwrite=overwrite, inputs=inputs) as tmp:
        container = av.open(str(tmp), mode="w")
        container.metadata[outputs.VIDEO_TAG] = outputs.new_mark()  # the tool's mark, nothing else
        written = 0
        try:
            stream = container.add_stream("libx264",
                                          rate=fractions.Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            audio = _AudioCopy(audio_from, container) if audio_from is not None else None

            def write(frames_NHW3):
                nonlocal written
                for frame in frames_NHW3:
                    if any(pad[0] + pad[1]):
                        frame = np.pad(frame, pad, mode="edge")
                    video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                             format="rgb24")
                    container.mux(stream.encode(video_frame))
                    written += 1

            yield write
            if not written:
                raise SafeTriageError(f"No frames were written, so {path} was not created.")
            container.mux(stream.encode(None))
            if audio is not None:
                audio.copy()
        finally:
            container.close()


class _AudioCopy:
    """The first audio track of a file, re-encoded as AAC into an output container (re-encoding
    takes any input codec, and mp4 cannot hold all of them)."""

    def __init__(self, source_path, container):
        self.source = av.open(str(source_path))
        if not self.source.streams.audio:
            self.source.close()
            raise SafeTriageError(f"{source_path} has no audio track to keep; do not ask for audio.")
        self.input = self.source.streams.audio[0]
        rate = self.input.codec_context.sample_rate or 48000
        self.output = container.add_stream("aac", rate=rate)
        self.output.layout = "stereo" if self.input.codec_context.channels > 1 else "mono"
        self.resampler = av.AudioResampler(format="fltp", layout=self.output.layout, rate=rate)
        self.container = container

    def copy(self):
        try:
            for frame in self.source.decode(self.input):
                frame.pts = None
                for resampled in self.resampler.resample(frame):
                    self.container.mux(self.output.encode(resampled))
            self.container.mux(self.output.encode(None))
        except av.error.FFmpegError as err:
            raise SafeTriageError(f"Could not copy the audio of {self.source.name} ({err}); "
                                  "write the video without audio.") from None
        finally:
            self.source.close()


def copy_first_frames(source_path, out_path, count):
    """Writes the first ``count`` frames of a video to ``out_path`` (same fps); returns
    (frames written, (height, width))."""
    with VideoReader(source_path) as reader:
        frames = [frame for _, frame in zip(range(count), reader)]
        fps = reader.fps
    with video_writer(out_path, fps, frames[0].shape[1], frames[0].shape[0]) as write:
        write(frames)
    return len(frames), frames[0].shape[:2]
