"""Simulated patients for prompt training: public-style synthetic faces with pathological motion.

Example ``i`` is rendered on the fly from ``(seed, i)``: a "patient" identity with a one-sided
droop (mouth corner sag, half-lowered lid, weaker smile and blink on that side; strength drawn
in ``asymmetry``) and fewer blinks, and a second "synthetic" identity rendered with exactly the
same motion: the ground truth of motion transfer. No patient data is involved. The droop side is
random (the whole example is mirrored half of the time).
"""

import dataclasses

import numpy as np

from safetriage_jax.data import synthetic_faces

TEST_SEED_OFFSET = 1_000_003  # held-out examples draw identities from a disjoint seed stream
IMAGE_KEYS = ("identity", "reference", "driving", "target")  # every example's images


@dataclasses.dataclass(frozen=True)
class PatientOptions:
    size: int = 64
    clip_frames: int = 24  # frames of motion drawn; reference and driving are two of them
    asymmetry: tuple = (0.3, 1.0)
    blink_rate: tuple = (0.2, 1.0)


class SimulatedPatients:
    """Random access: ``[i]`` -> dict of uint8 (size, size, 3) images ``identity`` (synthetic
    person at the reference frame), ``reference`` and ``driving`` (patient), ``target``
    (synthetic person at the driving frame)."""

    def __init__(self, options=PatientOptions(), seed=0, split="train", length=10**9):
        self.options, self.length = options, length
        self.seed = seed + (TEST_SEED_OFFSET if split == "test" else 0)

    def __len__(self):
        return self.length

    def __repr__(self):
        return f"SimulatedPatients({self.options}, seed={self.seed}, length={self.length})"

    def __getitem__(self, index):
        o = self.options
        rng = np.random.default_rng([self.seed, int(index)])
        patient = synthetic_faces.sample_identity(rng)
        synthetic = synthetic_faces.sample_identity(rng)
        motion = synthetic_faces.sample_motion(rng, o.clip_frames, asymmetry=rng.uniform(*o.asymmetry),
                                               blink_rate=rng.uniform(*o.blink_rate))
        frames = np.sort(rng.choice(o.clip_frames, 2, replace=False))
        if rng.random() < 0.5:
            frames = frames[::-1]
        pair = synthetic_faces.motion_slice(motion, frames)
        patient_frames = synthetic_faces.render(patient, pair, o.size)
        synthetic_frames = synthetic_faces.render(synthetic, pair, o.size)
        example = {"identity": synthetic_frames[0], "reference": patient_frames[0],
                   "driving": patient_frames[1], "target": synthetic_frames[1]}
        if rng.random() < 0.5:  # droop on the other side
            example = {k: v[:, ::-1].copy() for k, v in example.items()}
        return example


def patient_batches(options, batch_size, *, num_steps, seed=0, split="train", start_step=0,
                    worker_count=0):
    """This process's batches of simulated patients for steps ``start_step + 1 .. num_steps``:
    example ``i`` of global batch ``s`` is ``SimulatedPatients[s * batch_size + i]`` whatever
    the process count (see ``pipeline.process_batches``)."""
    from safetriage_jax.data.pipeline import process_batches
    return process_batches(SimulatedPatients(options, seed, split), global_batch_size=batch_size,
                           start_step=start_step, num_steps=num_steps, worker_count=worker_count)
