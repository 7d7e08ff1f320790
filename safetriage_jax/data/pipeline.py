"""grain input pipeline: (source, driving) frame pairs from a clip data source, sharded per process.

As upstream TPSMM: with id-sampling each step of the sampler is an *identity*, a random clip of
it is chosen, then two random frames (sorted); host-side augmentations are a horizontal flip of
both frames and a time flip (swap). Colour jitter runs on the device (``augment.color_jitter``).
Everything random is seeded from (seed, record index), so the pipeline's iterator state, saved
in checkpoints, resumes exactly.
"""

import dataclasses
import json
import pathlib

import grain.python as grain
import jax
import numpy as np

from safetriage_jax.errors import SafeTriageError


@dataclasses.dataclass(frozen=True)
class PairOptions:
    """What the training pipeline samples and how it augments (host side)."""

    id_sampling: bool = True
    num_repeats: int = 1
    horizontal_flip: bool = True
    time_flip: bool = True


class IdentityIndex(grain.RandomAccessDataSource):
    """Records = identities; each record is the list of clip indices of that identity."""

    def __init__(self, clips, identity_of_clip):
        self._clips = clips
        groups = {}
        for index, identity in enumerate(identity_of_clip):
            groups.setdefault(identity, []).append(index)
        self._groups = [groups[key] for key in sorted(groups)]

    def __len__(self):
        return len(self._groups)

    def __getitem__(self, index):
        return self._groups[index]

    def __repr__(self):  # grain checks the source of a restored state by its repr
        return f"IdentityIndex({describe(self._clips)}, identities={len(self)})"


class ClipIndex(grain.RandomAccessDataSource):
    """Records = clips (no id-sampling): each record is a one-clip list."""

    def __init__(self, clips):
        self._clips = clips

    def __len__(self):
        return len(self._clips)

    def __getitem__(self, index):
        return [index]

    def __repr__(self):
        return f"ClipIndex({describe(self._clips)})"


class Repeated(grain.RandomAccessDataSource):
    """Upstream's DatasetRepeater: ``num_repeats`` passes over the records make one epoch."""

    def __init__(self, source, num_repeats):
        self._source, self._repeats = source, num_repeats

    def __len__(self):
        return len(self._source) * self._repeats

    def __getitem__(self, index):
        return self._source[index % len(self._source)]

    def __repr__(self):
        return f"Repeated({self._source!r}, num_repeats={self._repeats})"


def describe(clips):
    """A short, stable description of a clip source (tfds sources have a good repr)."""
    text = repr(clips)
    return text if len(text) < 200 and " at 0x" not in text else f"{type(clips).__name__}[{len(clips)}]"


class SampleFramePair(grain.RandomMapTransform):
    """Clip list -> {'source', 'driving'} (H, W, 3) uint8, with flips."""

    def __init__(self, clips, options: PairOptions):
        self._clips, self._options = clips, options

    def random_map(self, clip_indices, rng: np.random.Generator):
        video = self._clips[int(rng.choice(clip_indices))]["video"]
        first, second = np.sort(rng.integers(0, len(video), size=2))
        pair = [video[first], video[second]]
        if self._options.horizontal_flip and rng.random() < 0.5:
            pair = [frame[:, ::-1] for frame in pair]
        if self._options.time_flip and rng.random() < 0.5:
            pair = pair[::-1]
        return {"source": np.ascontiguousarray(pair[0]), "driving": np.ascontiguousarray(pair[1])}


def identity_index(clips, cache_dir=None) -> list:
    """Identity of each record, read once and cached as JSON beside the dataset."""
    cache = pathlib.Path(cache_dir) / "identities.json" if cache_dir else None
    if cache is not None and cache.is_file():
        identities = json.loads(cache.read_text())
        if len(identities) == len(clips):
            return identities
    identities = [_text(clips[i]["identity"]) for i in range(len(clips))]
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(identities))
        tmp.replace(cache)
    return identities


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def training_pairs(clips, *, global_batch_size, seed, options: PairOptions, worker_count=0,
                   cache_dir=None):
    """An endless, checkpointable grain ``DataLoader`` of per-process batches of frame pairs.

    ``clips`` is a random-access source of records with a ``video`` (T, H, W, 3) uint8 entry
    (e.g. a tfds ``ArrayRecordDataSource``). Each process loads ``global_batch_size /
    process_count`` pairs per batch from its own shard of the sampler's stream.
    """
    if len(clips) == 0:
        raise SafeTriageError("The training split has no clips.")
    num_processes = jax.process_count()
    if global_batch_size % num_processes:
        raise SafeTriageError(f"batch_size {global_batch_size} must divide evenly over "
                              f"{num_processes} processes.")
    records = (IdentityIndex(clips, identity_index(clips, cache_dir)) if options.id_sampling
               else ClipIndex(clips))
    records = Repeated(records, options.num_repeats)
    if worker_count:  # grain's worker processes read absl flags, unparsed outside absl.app
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    shard = grain.ShardOptions(jax.process_index(), num_processes, drop_remainder=True)
    sampler = grain.IndexSampler(len(records), shard_options=shard, shuffle=True,
                                 num_epochs=None, seed=seed)
    return grain.DataLoader(
        data_source=records, sampler=sampler, worker_count=worker_count,
        operations=[SampleFramePair(clips, options),
                    grain.Batch(global_batch_size // num_processes, drop_remainder=True)])


def steps_per_epoch(clips, *, global_batch_size, options: PairOptions, cache_dir=None) -> int:
    """Optimizer steps in one (repeated) pass over the records, as upstream's drop_last loader."""
    num_records = (len(set(identity_index(clips, cache_dir))) if options.id_sampling
                   else len(clips))
    return max(1, num_records * options.num_repeats // global_batch_size)
