"""grain input pipeline: (source, driving) frame pairs from a clip data source, sharded per process.

As upstream TPSMM: with id-sampling each step of the sampler is an *identity*, a random clip of
it is chosen, then two random frames (sorted); host-side augmentations are a horizontal flip of
both frames and a time flip (swap). Colour jitter runs on the device (``augment.color_jitter``).
Everything random is seeded from (seed, stream position): the global batch of a step depends on
the seed and the step alone, whatever the process and device count, and a resumed run only needs
its step to continue the same stream.
"""

import dataclasses
import json
import pathlib

import grain
import jax
import numpy as np

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError


@dataclasses.dataclass(frozen=True)
class PairOptions:
    """What the training pipeline samples and how it augments (host side)."""

    id_sampling: bool = True
    num_repeats: int = 1
    horizontal_flip: bool = True
    time_flip: bool = True


class IdentityIndex(grain.sources.RandomAccessDataSource):
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

    def __repr__(self):
        return f"IdentityIndex({describe(self._clips)}, identities={len(self)})"


class ClipIndex(grain.sources.RandomAccessDataSource):
    """Records = clips (no id-sampling): each record is a one-clip list."""

    def __init__(self, clips):
        self._clips = clips

    def __len__(self):
        return len(self._clips)

    def __getitem__(self, index):
        return [index]

    def __repr__(self):
        return f"ClipIndex({describe(self._clips)})"


class Repeated(grain.sources.RandomAccessDataSource):
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


class SampleFramePair:
    """Clip list and generator -> {'source', 'driving'} (H, W, 3) uint8, with flips."""

    def __init__(self, clips, options: PairOptions):
        self._clips, self._options = clips, options

    def __call__(self, clip_indices, rng: np.random.Generator):
        video = self._clips[int(rng.choice(clip_indices))]["video"]
        first, second = np.sort(rng.integers(0, len(video), size=2))
        pair = [video[first], video[second]]
        if self._options.horizontal_flip and rng.random() < 0.5:
            pair = [frame[:, ::-1] for frame in pair]
        if self._options.time_flip and rng.random() < 0.5:
            pair = pair[::-1]
        return {"source": np.ascontiguousarray(pair[0]), "driving": np.ascontiguousarray(pair[1])}


def identity_index(clips, cache_dir=None) -> list:
    """Identity of each record, read once and cached as JSON beside the dataset. The cache
    carries the tool's mark, so a stale one is replaced only if this tool wrote it."""
    cache = pathlib.Path(cache_dir) / "identities.json" if cache_dir else None
    if cache is not None and cache.is_file():
        identities = _cached_identities(cache)
        if identities is not None and len(identities) == len(clips):
            return identities
    identities = [_text(clips[i]["identity"]) for i in range(len(clips))]
    if cache is not None:
        try:
            outputs.write_json(cache, {"identities": identities}, overwrite=True)
        except SafeTriageError:  # processes race to write it: the winner's equal cache is fine
            if _cached_identities(cache) != identities:
                raise
    return identities


def _cached_identities(cache):
    """The names in an identity cache (marked ``{"identities": [...]}``, or an earlier
    version's plain list), or None if it is not one."""
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    names = data.get("identities") if isinstance(data, dict) else data
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


class FramePairs(grain.sources.RandomAccessDataSource):
    """Global stream position -> a frame pair. Epoch ``e`` visits the records in a permutation
    drawn from (seed, e); the pair's clip, frames and flips are drawn from (seed, position). So
    the stream depends on the seed alone, never on how many processes read it."""

    def __init__(self, clips, records, options: PairOptions, *, seed, epoch_size):
        self._clips, self._records, self._seed, self._epoch_size = clips, records, seed, epoch_size
        self._pair = SampleFramePair(clips, options)
        self._cached = (None, None)

    def __len__(self):
        return 2**62

    def __getitem__(self, position):
        epoch, offset = divmod(int(position), self._epoch_size)
        cached_epoch, order = self._cached  # one permutation per epoch, kept while it lasts
        if epoch != cached_epoch:  # (one tuple: grain's reader threads share this object)
            order = np.random.default_rng([self._seed, epoch]).permutation(len(self._records))
            self._cached = (epoch, order)
        clip_indices = self._records[int(order[offset % len(self._records)])]
        return self._pair(clip_indices, np.random.default_rng([self._seed, 1, int(position)]))

    def __repr__(self):
        return f"FramePairs({self._records!r}, seed={self._seed}, epoch_size={self._epoch_size})"


class ProcessSlice(grain.sources.RandomAccessDataSource):
    """This process's examples of the global stream, in order: the ``j``-th is element
    ``p * L + j % L`` of global batch ``start_step + j // L`` (``L`` per-process batch size,
    ``p`` process index), i.e. stream position ``step * global_batch_size + p * L + j % L``."""

    def __init__(self, examples, *, global_batch_size, start_step, num_steps, process_index,
                 process_count):
        self._examples, self._global = examples, global_batch_size
        self._local = global_batch_size // process_count
        self._start, self._count, self._process = start_step, num_steps - start_step, process_index

    def __len__(self):
        return max(0, self._count) * self._local

    def __getitem__(self, j):
        step, within = divmod(int(j), self._local)
        return self._examples[(self._start + step) * self._global + self._process * self._local
                              + within]

    def __repr__(self):
        return (f"ProcessSlice({self._examples!r}, global_batch_size={self._global}, "
                f"start_step={self._start}, process={self._process})")


def process_batches(examples, *, global_batch_size, start_step=0, num_steps, worker_count=0,
                    process_index=None, process_count=None):
    """This process's slices of the global batches ``start_step + 1 .. num_steps`` (step ``s``
    trains on global batch ``s - 1``), as a grain iterator of numpy batches.

    ``examples`` is random access by stream position (``step * global_batch_size + i``), so the
    global batch of a step is the same for any process count, and resuming needs only the step.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise SafeTriageError(f"The batch size {global_batch_size} must divide evenly over "
                              f"{process_count} processes.")
    local = ProcessSlice(examples, global_batch_size=global_batch_size, start_step=start_step,
                         num_steps=num_steps, process_index=process_index,
                         process_count=process_count)
    dataset = grain.MapDataset.source(local).batch(global_batch_size // process_count,
                                                   drop_remainder=True)
    iterable = dataset.to_iter_dataset()
    if worker_count:  # grain's worker processes read absl flags, unparsed outside absl.app
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iterable)


def training_pairs(clips, *, global_batch_size, seed, options: PairOptions, num_steps,
                   start_step=0, worker_count=0, cache_dir=None, process_index=None,
                   process_count=None):
    """This process's batches of frame pairs for steps ``start_step + 1 .. num_steps``.

    ``clips`` is a random-access source of records with a ``video`` (T, H, W, 3) uint8 entry
    (e.g. a tfds ``ArrayRecordDataSource``). See :func:`process_batches` for the sharding.
    """
    if len(clips) == 0:
        raise SafeTriageError("The training split has no clips.")
    records = (IdentityIndex(clips, identity_index(clips, cache_dir)) if options.id_sampling
               else ClipIndex(clips))
    records = Repeated(records, options.num_repeats)
    epoch_size = global_batch_size * steps_per_epoch(clips, global_batch_size=global_batch_size,
                                                     options=options, cache_dir=cache_dir)
    pairs = FramePairs(clips, records, options, seed=seed, epoch_size=epoch_size)
    return process_batches(pairs, global_batch_size=global_batch_size, start_step=start_step,
                           num_steps=num_steps, worker_count=worker_count,
                           process_index=process_index, process_count=process_count)


def steps_per_epoch(clips, *, global_batch_size, options: PairOptions, cache_dir=None) -> int:
    """Optimizer steps in one (repeated) pass over the records, as upstream's drop_last loader."""
    num_records = (len(set(identity_index(clips, cache_dir))) if options.id_sampling
                   else len(clips))
    return max(1, num_records * options.num_repeats // global_batch_size)
