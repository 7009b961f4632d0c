"""Windowed torch dataset: reads windows only, normalises, maps nodata to ignore, augments
image and mask identically and deterministically."""

import pickle

import numpy as np
import pytest
import rasterio
import torch

from conftest import small_synthetic
from rsseg.config.specs import AugmentSpec
from rsseg.data import tiles
from rsseg.data.classes import IGNORE_INDEX
from rsseg.data.dataset import TileDataset, TileReader, apply_geometry, collate, draw_augment, stretch


@pytest.fixture
def index(workdir):
    return tiles.build(small_synthetic(), workdir)


def make(index, split="train", augment=None, seed=0):
    s = index.scenes
    return TileDataset(TileReader(s.scenes, s.table, s.bands, s.value_range), index.split(split), augment=augment, seed=seed)


def test_item_equals_the_window_of_the_full_scene(index):
    ds = make(index, "test")
    item = ds[0]
    row = index.split("test").row(0, named=True)
    scene = index.scenes.scenes[row["scene_idx"]]
    with rasterio.open(scene.image) as src:
        full = src.read().astype(np.float32)
        valid = src.dataset_mask() > 0
    with rasterio.open(scene.label) as lab:
        codes = lab.read(1)
    r, c, n = row["row"], row["col"], row["size"]
    want = full[:, r : r + n, c : c + n] / 127.5 - 1.0
    v = valid[r : r + n, c : c + n]
    want[:, ~v] = 0
    assert torch.allclose(item["image"], torch.from_numpy(want), atol=1e-6)
    want_mask = np.where(v, codes[r : r + n, c : c + n].astype(np.int64) - 1, IGNORE_INDEX)
    assert torch.equal(item["mask"], torch.from_numpy(want_mask))
    assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_nodata_pixels_are_ignored(index):
    ds = make(index, "test")
    found = False
    for i in range(len(ds)):
        it = ds[i]
        nodata = (it["image"] == 0).all(0)
        if nodata.any():
            assert (it["mask"][nodata] == IGNORE_INDEX).all()
            found = True
    frame = index.frame
    if (frame["valid_fraction"] < 1).sum() > 0 and (index.split("test")["valid_fraction"] < 1).any():
        assert found


def test_augmentation_moves_image_and_mask_together(index):
    aug = AugmentSpec(stretch=False, p=0.5)
    ds_plain, ds_aug = make(index), make(index, augment=aug, seed=5)
    for draw in range(12):
        it = ds_aug[(0, draw)]
        base = ds_plain[0]
        assert torch.equal(it["image"], apply_geometry(base["image"], it["variant"]))
        assert torch.equal(it["mask"], apply_geometry(base["mask"], it["variant"]))
    variants = [draw_augment(aug, 5, d).variant for d in range(200)]
    assert set(variants) == set(range(8))  # all eight rotations/reflections occur


def test_augmentation_is_a_pure_function_of_seed_and_draw(index):
    aug = AugmentSpec(p=0.7)
    a, b = make(index, augment=aug, seed=3), make(index, augment=aug, seed=3)
    for draw in range(8):
        assert torch.equal(a[(1, draw)]["image"], b[(1, draw)]["image"])
    assert any(not torch.equal(a[(1, d)]["image"], make(index, augment=aug, seed=4)[(1, d)]["image"]) for d in range(8))


def test_stretch_clips_the_cut_and_spans_the_range():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 255, size=(3, 64, 64)).astype(np.float32)
    valid = np.ones((64, 64), dtype=bool)
    out = stretch(raw, valid, 0.10)
    for b in range(3):
        clipped = ((out[b] <= -1) | (out[b] >= 1)).mean()
        assert clipped == pytest.approx(0.10, abs=0.01)
    assert out.min() == -1 and out.max() == 1


def test_rot90_k_in_1_2_3_and_flips():
    seen = set()
    for d in range(200):
        a = draw_augment(AugmentSpec(stretch=False, flip=False, p=1.0), 0, d)
        seen.add(a.k)
        assert not a.flip
    assert seen == {1, 2, 3}


def test_pickles_without_open_handles(index):
    ds = make(index)
    ds[0]
    assert ds.reader._handles
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.reader._handles == {}
    assert torch.equal(clone[0]["image"], ds[0]["image"])


def test_dataloader_workers_read_their_own_handles(index):
    ds = make(index, "test")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["image"]) for b in batches) == len(ds)
    assert torch.equal(batches[0]["image"][0], ds[0]["image"])
