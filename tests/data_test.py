"""Dataset builders (tfds, array_record) and the grain pair pipeline."""

import json

import numpy as np
import pytest

from safetriage_jax.data import builders, pipeline
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.video import video_writer


def numbered_clips(num_identities, clips_each, frames=6, size=8):
    """In-memory clips whose pixels encode (clip index, frame index) so samples can be traced."""
    clips = []
    for person in range(num_identities):
        for _ in range(clips_each):
            video = np.zeros((frames, size, size, 3), np.uint8)
            video[..., 0] = len(clips)
            video[..., 1] = np.arange(frames)[:, None, None]
            video[:, :, : size // 2, 2] = 255  # left half marked, to see horizontal flips
            clips.append({"video": video, "identity": f"p{person}".encode()})
    return clips


def drain(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)], it


def test_pairs_are_two_sorted_frames_of_one_clip_with_flips():
    clips = numbered_clips(3, 2)
    options = pipeline.PairOptions(id_sampling=True, num_repeats=4)
    batches, _ = drain(pipeline.training_pairs(clips, global_batch_size=4, seed=1,
                                               options=options, num_steps=12), 12)
    flips = time_flips = 0
    for batch in batches:
        assert batch["source"].shape == (4, 8, 8, 3) and batch["source"].dtype == np.uint8
        same_clip = batch["source"][:, 0, 0, 0] == batch["driving"][:, 0, 0, 0]
        assert same_clip.all()
        flips += int((batch["source"][:, 0, 0, 2] == 0).sum())
        time_flips += int((batch["source"][:, 0, 0, 1] > batch["driving"][:, 0, 0, 1]).sum())
    assert 0 < flips < 48 and 0 < time_flips < 48  # both augmentations happen, not always
    assert pipeline.steps_per_epoch(clips, global_batch_size=4, options=options) == 3


def test_the_global_batch_depends_on_seed_and_step_alone():
    """1 and 2 processes see the same global batches in the same order, and a stream started
    at a later step (a resume) continues it; another seed gives another stream."""
    clips = numbered_clips(4, 2)
    options = pipeline.PairOptions(id_sampling=False, num_repeats=2)
    make = lambda processes=1, index=0, start=0, seed=7: pipeline.training_pairs(
        clips, global_batch_size=4, seed=seed, options=options, num_steps=6, start_step=start,
        process_index=index, process_count=processes)
    reference = list(make())
    assert len(reference) == 6
    halves = [list(make(2, index)) for index in range(2)]
    resumed = list(make(2, 1, start=3))
    for step, expected in enumerate(reference):
        for key in ("source", "driving"):
            together = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(together, expected[key])
            if step >= 3:
                np.testing.assert_array_equal(resumed[step - 3][key], expected[key][2:])
    other = list(make(seed=8))
    assert any(not np.array_equal(a["source"], b["source"]) for a, b in zip(reference, other))
    first_epoch = np.concatenate([batch["source"][:, 0, 0, 0] for batch in reference[:4]])
    assert sorted(first_epoch.tolist()) == sorted(list(range(8)) * 2)  # each clip num_repeats times


def write_clip(path, frames):
    with video_writer(path, 25, frames.shape[2], frames.shape[1]) as write:
        write(frames)


def test_folder_builder_holds_out_whole_identities(tmp_path, rng):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ["ana#a1.mp4", "ana#a2.mp4", "ben#b1.mp4", "cy#c1.mp4", "dee#d1.mp4"]:
        write_clip(folder / name, rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8))
    frames_dir = folder / "eve#e1"
    frames_dir.mkdir()
    from PIL import Image
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(frames_dir / f"{i:03d}.png")
    builder = builders.build("folder", tmp_path / "tfds", manual_dir=folder, size=32,
                             test_fraction=0.4)
    sources = builder.as_data_source()
    train = {sources["train"][i]["clip"].decode() for i in range(len(sources["train"]))}
    test = {sources["test"][i]["clip"].decode() for i in range(len(sources["test"]))}
    assert len(train) + len(test) == 6
    identities = lambda names: {builders.identity_of(n) for n in names}
    assert not identities(train) & identities(test) and len(identities(test)) == 2
    record = sources["train"][0]
    assert record["video"].shape[1:] == (32, 32, 3) and record["video"].dtype == np.uint8


def test_folder_builder_errors_name_the_problem(tmp_path):
    with pytest.raises(SafeTriageError, match="does not exist"):
        builders.build("folder", tmp_path / "tfds", manual_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafeTriageError, match="holds no clips"):
        builders.build("folder", tmp_path / "tfds", manual_dir=tmp_path / "empty")
    with pytest.raises(SafeTriageError, match="Unknown dataset builder"):
        builders.build("imagenet", tmp_path / "tfds")


def test_synthetic_builder_records_reproduce_from_their_parameters(tmp_path):
    from safetriage_jax.data import synthetic_faces
    builder = builders.build("synthetic", tmp_path, size=32, train_identities=3, test_identities=2,
                             clips_per_identity=2, frames_per_clip=5, asymmetric_fraction=0.5)
    sources = builder.as_data_source()
    assert (len(sources["train"]), len(sources["test"])) == (6, 4)
    train_ids = {sources["train"][i]["identity"] for i in range(6)}
    test_ids = {sources["test"][i]["identity"] for i in range(4)}
    assert len(train_ids) == 3 and len(test_ids) == 2 and not train_ids & test_ids
    record = sources["test"][1]
    assert record["video"].shape == (5, 32, 32, 3)
    assert record["landmarks"].shape == (5, synthetic_faces.NUM_LANDMARKS, 2)
    identity = synthetic_faces.sample_identity(np.random.default_rng(int(record["identity_seed"])))
    motion = builders.motion_dict(record["motion"])
    np.testing.assert_array_equal(synthetic_faces.render(identity, motion, 32), record["video"])
    np.testing.assert_allclose(synthetic_faces.landmarks(identity, motion), record["landmarks"],
                               atol=1e-6)


def test_worker_processes_give_the_same_stream():
    clips = numbered_clips(3, 2)
    options = pipeline.PairOptions(id_sampling=True, num_repeats=2)
    make = lambda workers, start=0: list(pipeline.training_pairs(
        clips, global_batch_size=2, seed=5, options=options, num_steps=4, start_step=start,
        worker_count=workers))
    reference = make(0)
    for got, expected in zip(make(2) + make(2, start=2), reference + reference[2:]):
        np.testing.assert_array_equal(got["driving"], expected["driving"])


def test_the_identity_cache_is_written_atomically_and_replaces_only_its_own(tmp_path):
    clips = numbered_clips(2, 2)
    assert pipeline.identity_index(clips, tmp_path) == ["p0", "p0", "p1", "p1"]
    cache = tmp_path / "identities.json"
    assert json.loads(cache.read_text())["identities"] == ["p0", "p0", "p1", "p1"]
    assert [p.name for p in tmp_path.iterdir()] == ["identities.json"]  # no staging left
    clips += numbered_clips(1, 1)  # another dataset: the stale cache is rebuilt
    assert pipeline.identity_index(clips, tmp_path) == ["p0", "p0", "p1", "p1", "p0"]
    cache.write_text('{"my": "notes"}')
    with pytest.raises(SafeTriageError, match="not a file this tool wrote"):
        pipeline.identity_index(clips, tmp_path)
    assert cache.read_text() == '{"my": "notes"}'
