"""nnU-Net-style sliding-window inference that can stop between tile batches and resume bit-exactly.

A volume larger than the model's patch is covered by overlapping tiles; each tile's output is weighted
by a Gaussian (sigma = patch / 8) so tile borders, where a CNN sees least context, count least, and the
weighted sum is divided by the summed weights. Tile positions, padding and weighting mirror the training
code (models/train/ct_common.sliding_window) so the appliance reproduces the validated numbers.

Between tile batches the gate is asked. When it says stop, the accumulators and the next tile index
are saved and `Preempted` is raised; a resumed run loads them and continues at that tile. Tiles are
always accumulated in the same order into the same float32 arrays and the weight normaliser is
computed from the tile list alone, so a resumed result is bitwise the result of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.pipeline.checkpoint import CheckpointStore, Gate, Preempted

log = get_logger("edgescreen.appliance.pipeline.sliding_window")

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@lru_cache(maxsize=8)
def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's tile weight: 1 at the centre, small but never zero at the border."""
    grid = np.zeros(patch, dtype=np.float32)
    grid[tuple(p // 2 for p in patch)] = 1.0
    weight = ndimage.gaussian_filter(grid, [p * sigma_scale for p in patch], mode="constant", cval=0.0)
    weight /= weight.max()
    weight[weight == 0] = weight[weight > 0].min()
    weight.setflags(write=False)
    return weight.astype(np.float32)


def tile_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread tile starts covering [0, length) with at least `overlap` between neighbours."""
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = int(np.ceil((length - patch) / step)) + 1
    return [int(round(i * (length - patch) / (n - 1))) for i in range(n)]


def tile_grid(shape: Sequence[int], patch: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    zs, ys, xs = (tile_starts(s, p, overlap) for s, p in zip(shape, patch, strict=True))
    return [(z, y, x) for z in zs for y in ys for x in xs]


@dataclass(frozen=True)
class WindowSpec:
    """What the sliding window needs to know about the model, from its card."""

    patch: tuple[int, int, int]
    overlap: float
    segmentation: tuple[str, ...]  # outputs accumulated voxel-wise (already activated by `predict`)
    classification: tuple[str, ...] = ()  # per-tile outputs combined by max over tiles
    batch_size: int = 1
    pad_value: float = 0.0
    features: tuple[str, ...] = ()  # per-tile pooled features (F,), averaged over tiles (the study's description)


def _pad(image: dict[str, np.ndarray], patch: Sequence[int], value: float) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in image.items():
        pads = [(0, max(p - s, 0)) for s, p in zip(arr.shape[1:], patch, strict=True)]
        out[name] = np.pad(arr, [(0, 0), *pads], mode="constant", constant_values=value) if any(p[1] for p in pads) else arr
    return out


def _fingerprint(shape: Sequence[int], spec: WindowSpec, n_tiles: int) -> dict:
    return {"shape": list(shape), "patch": list(spec.patch), "overlap": spec.overlap, "tiles": n_tiles}


def _normaliser(shape: Sequence[int], tiles: list[tuple[int, int, int]], patch: Sequence[int]) -> np.ndarray:
    weight = gaussian_importance(tuple(patch))
    norm = np.zeros(tuple(shape), dtype=np.float32)
    for z, y, x in tiles:
        norm[z:z + patch[0], y:y + patch[1], x:x + patch[2]] += weight
    return norm


class _State:
    """The accumulators: what a preempted window saves and a resumed one loads."""

    def __init__(self, next_tile: int, sums: dict[str, np.ndarray], maxima: dict[str, np.ndarray],
                 features: dict[str, np.ndarray] | None = None) -> None:
        self.next_tile = next_tile
        self.sums = sums
        self.maxima = maxima
        self.features = features or {}  # running sums over tiles, float64

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{f"sum/{k}": v for k, v in self.sums.items()}, **{f"max/{k}": v for k, v in self.maxima.items()},
                **{f"feat/{k}": v for k, v in self.features.items()}}

    @classmethod
    def from_arrays(cls, next_tile: int, arrays: dict[str, np.ndarray]) -> _State:
        sums = {k[4:]: v for k, v in arrays.items() if k.startswith("sum/")}
        maxima = {k[4:]: v for k, v in arrays.items() if k.startswith("max/")}
        features = {k[5:]: v for k, v in arrays.items() if k.startswith("feat/")}
        return cls(next_tile, sums, maxima, features)


def _resume(store: CheckpointStore | None, name: str, fingerprint: dict) -> _State | None:
    if store is None:
        return None
    saved = store.load(name)
    if saved is None or saved[1].get("fingerprint") != fingerprint:
        return None
    return _State.from_arrays(int(saved[1]["next_tile"]), saved[0])


def _accumulate(state: _State, outputs: dict[str, np.ndarray], batch: list[tuple[int, int, int]], spec: WindowSpec,
                shape: Sequence[int]) -> None:
    weight = gaussian_importance(spec.patch)
    p = spec.patch
    for b, (z, y, x) in enumerate(batch):
        for name in spec.segmentation:
            tile = np.asarray(outputs[name][b], dtype=np.float32)
            acc = state.sums.get(name)
            if acc is None:  # not setdefault: its default would allocate a whole-volume array for every tile
                acc = state.sums[name] = np.zeros((tile.shape[0], *shape), dtype=np.float32)
            acc[:, z:z + p[0], y:y + p[1], x:x + p[2]] += tile * weight
        for name in spec.classification:
            value = np.asarray(outputs[name][b], dtype=np.float32).reshape(-1)
            prev = state.maxima.get(name)
            state.maxima[name] = value if prev is None else np.maximum(prev, value)
        for name in spec.features:
            value = np.asarray(outputs[name][b], dtype=np.float64).reshape(-1)
            prev = state.features.get(name)
            state.features[name] = value if prev is None else prev + value


def sliding_window(
    image: dict[str, np.ndarray],
    predict: Predict,
    spec: WindowSpec,
    *,
    gate: Gate | None = None,
    safe_point: str = "tiles",
    store: CheckpointStore | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run `predict` over tiles of `image` (input name -> (C, Z, Y, X)); return the combined outputs.

    Segmentation outputs come back as (C, Z, Y, X) weighted means on the image's grid, classification
    outputs as the per-class maximum over tiles (a lesion lives in one tile; averaging would dilute it),
    features outputs as the mean (F,) over tiles.
    Before every batch but the first the gate is asked at ``f"{safe_point}@{tile index}"``.
    """
    shape = next(iter(image.values())).shape[1:]
    padded = _pad(image, spec.patch, spec.pad_value)
    pshape = next(iter(padded.values())).shape[1:]
    tiles = tile_grid(pshape, spec.patch, spec.overlap)
    fingerprint = _fingerprint(pshape, spec, len(tiles))
    state = _resume(store, safe_point, fingerprint) or _State(0, {}, {})
    p = spec.patch
    while state.next_tile < len(tiles):
        start = state.next_tile
        point = f"{safe_point}@{start}"
        if start > 0 and gate is not None and not gate(point):
            if store is not None:
                store.save(safe_point, state.arrays(), {"next_tile": start, "fingerprint": fingerprint})
            log.info("preempted between tile batches", safe_point=point, tiles=len(tiles))
            raise Preempted(point)
        batch = tiles[start:start + spec.batch_size]
        inputs = {name: np.stack([arr[:, z:z + p[0], y:y + p[1], x:x + p[2]] for z, y, x in batch])
                  for name, arr in padded.items()}
        _accumulate(state, predict(inputs), batch, spec, pshape)
        state.next_tile = start + len(batch)
        if progress is not None:
            progress(state.next_tile / len(tiles))
    norm = _normaliser(pshape, tiles, p)
    out: dict[str, np.ndarray] = {}
    for name, acc in state.sums.items():
        acc /= norm[None]
        out[name] = acc[:, : shape[0], : shape[1], : shape[2]]
    out.update(state.maxima)
    out.update({name: (total / len(tiles)).astype(np.float32) for name, total in state.features.items()})
    return out  # the caller drops the tile checkpoint once it has saved the stage result
