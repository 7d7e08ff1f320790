"""Training logs: per-step metrics as JSON lines and TensorBoard scalars, and PNG sample grids."""

import json
import pathlib

import numpy as np
from PIL import Image


class Logbook:
    """Writes ``metrics.jsonl``, TensorBoard events (``tb/``) and ``samples/step_*.png`` in the
    work dir; only process 0 writes."""

    def __init__(self, workdir, enabled=True):
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.workdir / "tb"))
            except ImportError:
                self._tb = None

    def scalars(self, step, metrics: dict):
        if not self.enabled:
            return
        values = {key: float(value) for key, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, int(step))

    def samples(self, step, grid_HW3):
        if not self.enabled:
            return None
        path = self.workdir / "samples" / f"step_{int(step):08d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(grid_HW3).save(path)
        if self._tb is not None:
            self._tb.add_image("samples", grid_HW3, int(step), dataformats="HWC")
        return path

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def sample_grid(*columns_BHWC, max_rows=4):
    """uint8 grid, one row per example, one column per image batch (values in [0, 1]; one-channel
    maps are shown grey, every cell resized to the first column's size). The backbone trainer
    shows source | driving | prediction | occlusion."""
    height, width = columns_BHWC[0].shape[1:3]

    def cell(image_HWC):
        image = (np.clip(np.asarray(image_HWC, np.float32), 0, 1) * 255).round().astype(np.uint8)
        image = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))

    rows = [np.concatenate([cell(column[i]) for column in columns_BHWC], axis=1)
            for i in range(min(max_rows, columns_BHWC[0].shape[0]))]
    return np.concatenate(rows, axis=0)
