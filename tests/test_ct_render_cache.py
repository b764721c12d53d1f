"""Phantom renders for the CT trainers: the parallel warm-up changes nothing but the wall time.

Why: training and evaluation pre-render phantoms in one process per core and then load them through
the cache in one sequential loop. A worker that rendered something else, wrote a half file, or hid a
seed the generator rejects would silently change what a model is trained or evaluated on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgescreen.models.train import ct_data


def _small(seed: int, lesion: str | None) -> dict[str, np.ndarray]:
    """A cheap cached render (the real generator, a 24x24 matrix) so the test takes seconds."""
    if seed == 7:
        raise ct_data.PhantomError("seed 7 rejected for the test")

    def build() -> dict[str, np.ndarray]:
        ph = ct_data.phantom().generate_ct_volume(seed, lesion, matrix=24, slices=10)
        return {"hu": ph.hu, "labels": ph.labels}

    return ct_data._cached("small", seed, lesion, build)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(ct_data, "CACHE_ROOT", tmp_path)
    return tmp_path


def test_parallel_prerender_gives_the_same_items_as_a_sequential_run(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESCREEN_RENDER_WORKERS", "2")
    seeds, items, skipped = ct_data.collect(3, 6, _small)
    files = sorted(p.name for p in cache.rglob("*.npz"))
    assert len(files) >= 6 and not list(cache.rglob("*.tmp*")), files  # the warm-up wrote whole files only

    monkeypatch.setenv("EDGESCREEN_RENDER_WORKERS", "1")
    monkeypatch.setattr(ct_data, "CACHE_ROOT", cache / "sequential")
    seeds1, items1, skipped1 = ct_data.collect(3, 6, _small)

    assert seeds == seeds1 and skipped == skipped1 == [7]
    assert 7 not in seeds and len(seeds) == 6
    for a, b in zip(items, items1, strict=True):
        assert np.array_equal(a["hu"], b["hu"]) and np.array_equal(a["labels"], b["labels"])


def test_lesion_choice_follows_lesion_of_and_false_skips_the_seed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESCREEN_RENDER_WORKERS", "2")
    lesion_of = lambda s: False if s % 2 else "pdac"  # noqa: E731 - odd seeds are not wanted at all
    seeds, _, _ = ct_data.collect(10, 3, _small, lesion_of=lesion_of)
    assert seeds == [10, 12, 14]
    assert sorted(p.name for p in cache.rglob("*.npz"))[:3] == ["10-pdac.npz", "12-pdac.npz", "14-pdac.npz"]
