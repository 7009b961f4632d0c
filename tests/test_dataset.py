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


USER_DATASET = '''
from pathlib import Path

from rsseg.data.datasets import Dataset
from rsseg.data.scenes import Scene, SceneSet


def _scenes(spec, table, workdir):
    root = Path(spec.root)
    labelled = tuple(Scene(id=p.name.split(".")[0], image=p, label=p.with_name(p.name.replace(".img.", ".mask.")))
                     for p in sorted(root.glob("*.img.tif")))
    return SceneSet("mine", root, table, labelled, layout="<id>.img.tif + <id>.mask.tif")


DATASET = Dataset(_scenes, "synthetic7")
'''


def test_a_dataset_from_an_installed_package_is_chosen_from_yaml_and_fine_tunes(workdir, tmp_path, monkeypatch):
    """A user's own layout (``<id>.img.tif`` + ``<id>.mask.tif``) registered through the
    ``rsseg.datasets`` entry points, without touching platform/: named in YAML, read, fine-tuned."""
    import shutil

    from conftest import install_plugin, tiny_run
    from rsseg import finetune
    from rsseg.config.specs import SyntheticSpec
    from rsseg.data import datasets, registry, synthetic
    from rsseg.errors import ConfigError
    from rsseg.runspec import load_run

    src = synthetic.ensure(SyntheticSpec(scenes=3, size=128, unlabeled_scenes=1, archive_scenes=1), tmp_path / "gen")
    mine = tmp_path / "mine"
    mine.mkdir()
    for p in sorted((src / "labelled").glob("scene_*.tif")):
        if not p.stem.endswith("_label"):
            shutil.copy(p, mine / f"{p.stem}.img.tif")
            shutil.copy(p.with_name(p.stem + "_label.tif"), mine / f"{p.stem}.mask.tif")
    doc = tmp_path / "run.yaml"
    doc.write_text(f"data: {{dataset: mine, root: {mine}, tile_size: 32}}\n")
    # negative control: not installed, the name is refused with the datasets there are
    with pytest.raises(ConfigError, match=r"run.yaml: data.dataset: unknown dataset 'mine'; expected one of folder, gid, minifrance, synthetic$"):
        load_run(doc)
    (tmp_path / "site").mkdir()
    install_plugin(tmp_path / "site", monkeypatch, "my_datasets", USER_DATASET, "rsseg.datasets", "mine = my_datasets:DATASET")
    datasets._installed.cache_clear()  # installed after this process read the entry points
    try:
        assert load_run(doc).spec.data.dataset == "mine"
        run = tiny_run(data={"dataset": "mine", "root": str(mine)}, ddpm={"features": {"weights": "random", "timesteps": [0]}},
                       finetune={"iterations": 4, "eval_every": 2})
        found = registry.scenes(run.data, workdir)
        assert found.dataset == "mine" and len(found.labelled) == 3 and found.table.name == "synthetic7"
        result = finetune.run(run, workdir)
        assert result.class_abbrs == found.table.abbrs and len(result.val_history) == 2 and result.test.miou > 0
    finally:
        datasets._installed.cache_clear()
