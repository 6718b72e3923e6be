"""Time the geojson plugin on a large plane: ``python plugins/cellseg1d-geojson/bench_geojson.py``.

Two 2048 x 2048 label planes with about 2000 cells each: separate elliptic
cells (``cellseg1d.testing.synthetic.make_cells``) and a dense tiling of touching
cells with ragged, noisy borders (every pixel belongs to a cell). For each it
prints the time of the tracing alone, of the features (tracing, validity
check, properties) and of writing them as ``cells.geojson``, best of
``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from cellseg1d_geojson import plane_features
from cellseg1d_geojson.outline import trace_outlines
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from cellseg1d.testing.synthetic import make_cells


def dense_cells(size: int, n: int, seed: int = 0) -> np.ndarray:
    """Touching cells: nearest of ``n`` random seeds, borders roughened by noise."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, size, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    jitter = ndi.gaussian_filter(rng.normal(size=(2, size, size)).astype(np.float32), (0, 2, 2)) * 6
    points = np.stack([(yy + jitter[0]).ravel(), (xx + jitter[1]).ravel()], axis=1)
    _, nearest = cKDTree(seeds).query(points)
    return (nearest + 1).reshape(size, size).astype(np.uint32)


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    planes = {
        "separate cells": make_cells((args.size, args.size), args.cells, radius=(8, 16), seed=1)[1],
        "dense ragged cells": dense_cells(args.size, args.cells, seed=2),
    }
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "cells.geojson"
        for name, plane in planes.items():
            n = len(np.unique(plane[plane > 0]))
            trace_s, outlines = best(lambda plane=plane: trace_outlines(plane), args.repeat)
            features_s, (_, repaired) = best(lambda plane=plane: plane_features(plane, 0, 0), args.repeat)

            def write(plane: np.ndarray = plane) -> None:
                with open(out, "w", encoding="utf-8") as handle:
                    handle.write('{"type":"FeatureCollection","features":[')
                    for i, feature in enumerate(plane_features(plane, 0, 0)[0]):
                        handle.write(",\n" if i else "\n")
                        handle.write(json.dumps(feature, separators=(",", ":")))
                    handle.write("\n]}\n")

            total_s, _ = best(write, args.repeat)
            vertices = sum(len(s) + sum(len(h) for h in holes) for o in outlines for s, holes in o.pieces)
            print(f"{name}: {args.size}x{args.size}, {n} cells, {vertices} corners, repaired {repaired}")
            print(f"  trace {trace_s:.3f} s | features {features_s:.3f} s | "
                  f"features + write {total_s:.3f} s ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
