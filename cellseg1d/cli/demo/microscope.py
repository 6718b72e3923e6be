"""The simulated microscope: acquisitions planned ahead, images written chunk by chunk as a camera would."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellseg1d.testing import TINY_SAM_BASE

#: Tiles the simulated microscope writes at a time (y, x pixels).
TILE = 128
#: Plain images are between these sizes (pixels per side).
SIZES = (256, 320, 384)
#: Size of the fields of the HCS plate.
FIELD_SIZE = 256
CHANNELS = ["nuclei", "membrane"]
#: Roughly one cell per this many pixels (cells are 6-11 px in radius).
PIXELS_PER_CELL = 2200
SEED = 20240611
POLL_SECONDS = 0.25
LOG_TAIL_LINES = 40
#: The stand-in SAM base of ``--sam`` (a tiny SAM-architecture model pretrained on synthetic cells).
TINY_BASE = TINY_SAM_BASE
#: The demo's experiment (every image of the acquisition folder) and its adapter.
EXPERIMENT = "demo-cells"
#: Training of the ``--sam`` adapter: one image of this size, this many optimiser steps (a few minutes on 2 CPUs).
TRAIN_SIZE, TRAIN_STEPS = 256, 40
#: SAM settings of the ``--sam`` daemon: the tiny base's input size; planes in 128-pixel tiles (shown at 256,
#: the scale the base learnt cells at) with an 8 x 8 point grid each, no crops.
SAM_SETTINGS = {"model_type": "tiny", "allow_custom_checkpoint": True, "image_size": 256, "points_per_side": 8,
                "crop_n_layers": 0, "tile": 128, "tile_overlap": 32, "device": "cpu"}


class _Stopped(Exception):
    """Raised inside the writer when the demo is interrupted."""


@dataclass
class DemoImage:
    """One image (a plain image or one field of a plate) the microscope writes."""

    rel: str  # path relative to the acquisition folder
    path: Path
    mask: np.ndarray
    ngff: str
    written_at: float | None = None  # time.time() once fully written


@dataclass
class Acquisition:
    """One container the microscope writes: a plain image or a plate of fields."""

    rel: str
    kind: str  # "image" or "plate"
    ngff: str
    pause: float
    images: list[DemoImage]
    data: list[np.ndarray]
    keys: list[tuple[str, str, str]] = field(default_factory=list)  # plate fields

    @property
    def n_chunks(self) -> list[int]:
        """Level-0 chunks of every image (channel x tiles)."""
        return [d.shape[0] * math.ceil(d.shape[-2] / TILE) * math.ceil(d.shape[-1] / TILE) for d in self.data]


def n_cells_for(h: int, w: int) -> int:
    """How many cells a field of h x w pixels holds (the density of the demo's images)."""
    return max(8, (h * w) // PIXELS_PER_CELL)


def plan_acquisitions(n_images: int, acq: Path, settle_seconds: float, seed: int = SEED) -> list[Acquisition]:
    """Decide what the microscope writes: ``n_images`` images in all, a plate's fields included.

    From 3 images on, one container is an HCS plate (2 wells, 1 field each; 2 fields
    each from 8 images on); the rest are plain images, one of them NGFF 0.4, the
    others 0.5.
    """
    from cellseg1d.testing.synthetic import make_czyx

    rng = np.random.default_rng(seed)
    if n_images >= 8:
        plate_fields = 4
    elif n_images >= 3:
        plate_fields = 2
    elif n_images == 2:
        plate_fields = 1
    else:
        plate_fields = 0
    n_plain = n_images - plate_fields
    # The one NGFF 0.4 image: the second plain image, or the only one beside a plate.
    v04_index = 1 if n_plain >= 2 else (0 if plate_fields else -1)
    max_pause = 0.5 * settle_seconds  # always well inside the settle time

    def pause() -> float:
        return float(min(rng.uniform(0.2, 0.4), max_pause))

    acquisitions: list[Acquisition] = []
    for i in range(n_plain):
        h, w = (int(rng.choice(SIZES)) for _ in range(2))
        data, mask = make_czyx((h, w), n_cells_for(h, w), n_channels=2, seed=int(rng.integers(1 << 31)))
        rel = f"sample_{i + 1:02d}.ome.zarr"
        version = "0.4" if i == v04_index else "0.5"
        img = DemoImage(rel, acq / rel, mask, version)
        acquisitions.append(Acquisition(rel, "image", version, pause(), [img], [data[0]]))
    if plate_fields:
        rel = "plate_01.ome.zarr"
        wells = [("A", "1"), ("A", "2")] if plate_fields > 1 else [("A", "1")]
        per_well = 2 if plate_fields == 4 else 1
        keys = [(r, c, str(f)) for r, c in wells for f in range(per_well)]
        images, data = [], []
        for r, c, f in keys:
            d, mask = make_czyx((FIELD_SIZE, FIELD_SIZE), n_cells_for(FIELD_SIZE, FIELD_SIZE),
                                n_channels=2, seed=int(rng.integers(1 << 31)))
            frel = f"{rel}/{r}/{c}/{f}"
            images.append(DemoImage(frel, acq / frel, mask, "0.5"))
            data.append(d[0])
        plate = Acquisition(rel, "plate", "0.5", pause(), images, data, keys)
        # The plate comes second, between plain images, as a mixed session would.
        acquisitions.insert(min(1, len(acquisitions)), plate)
    return acquisitions


class Microscope(threading.Thread):
    """Writes the planned acquisitions one after another, tile by tile."""

    def __init__(self, acquisitions: list[Acquisition], acq: Path) -> None:
        super().__init__(name="microscope", daemon=True)
        self.acquisitions = acquisitions
        self.acq = acq
        self.stop_event = threading.Event()
        self.current = ""
        self.error: BaseException | None = None
        self.finished = False

    @property
    def written(self) -> int:
        return sum(1 for a in self.acquisitions for i in a.images if i.written_at is not None)

    def run(self) -> None:
        try:
            for acquisition in self.acquisitions:
                if self.stop_event.is_set():
                    return
                self._write(acquisition)
            self.finished = True
        except _Stopped:
            return
        except BaseException as err:  # reported by the main thread
            self.error = err

    def _write(self, a: Acquisition) -> None:
        from cellseg1d.testing.synthetic import write_ome_zarr, write_plate

        self.current = a.rel
        # Field k is complete (pyramid included) when field k+1's first tile arrives.
        starts = np.cumsum([0, *a.n_chunks])
        count = 0

        def on_chunk() -> None:
            nonlocal count
            if self.stop_event.is_set():
                raise _Stopped
            count += 1
            for k, start in enumerate(starts[1:-1]):
                if count == start + 1 and a.images[k].written_at is None:
                    a.images[k].written_at = time.time()

        common: dict[str, Any] = dict(
            axes="czyx", ngff_version=a.ngff, chunks=(1, 1, TILE, TILE), channel_names=CHANNELS,
            n_levels=2, pause=a.pause, on_chunk=on_chunk,
        )
        if a.kind == "plate":
            write_plate(self.acq / a.rel, dict(zip(a.keys, a.data, strict=True)), **common)
        else:
            write_ome_zarr(self.acq / a.rel, a.data[0], **common)
        now = time.time()
        for img in a.images:
            if img.written_at is None:
                img.written_at = now
