"""Finding images inside containers: plain images, plates and bioformats2raw series."""

from __future__ import annotations

import json
from pathlib import Path

from cellseg1d.ngff.discover import list_images
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr


def test_bioformats2raw_series_are_images(tmp_path: Path) -> None:
    container = tmp_path / "slide.zarr"
    container.mkdir()
    (container / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (container / ".zattrs").write_text(json.dumps({"bioformats2raw.layout": 3}))
    (container / "OME").mkdir()
    (container / "OME" / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (container / "OME" / ".zattrs").write_text(json.dumps({"series": ["0", "1"]}))
    data, _ = make_czyx((32, 32), 2)
    for series in ("0", "1"):
        write_ome_zarr(container / series, data[0], axes="czyx", ngff_version="0.4", n_levels=1)
    assert list_images(container) == [container / "0", container / "1"]


def test_plain_image_is_its_own_container(tmp_path: Path) -> None:
    data, _ = make_czyx((32, 32), 2)
    image = write_ome_zarr(tmp_path / "img.zarr", data[0], axes="czyx")
    (image / "labels").mkdir()
    assert list_images(image) == [image]
