"""Artifact images: the prediction overlay carries a legend of the classes it shows."""

import numpy as np
import torch
from PIL import Image

from rsseg.viz import save_overlays

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
NAMES = ["urban", "forest", "water", "crops"]


def _tiles():
    images = torch.zeros(2, 3, 32, 32)
    truth = torch.zeros(2, 32, 32, dtype=torch.long)
    truth[:, :, 16:] = 2
    truth[0, :4, :4] = 255  # ignored pixels
    pred = truth.clone()
    pred[pred == 255] = 0
    return images, truth, pred


def _colours(img: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3)}


def test_overlay_legend_shows_the_colours_of_the_classes_present(tmp_path):
    images, truth, pred = _tiles()
    plain = Image.open(save_overlays(images, truth, pred, PALETTE, tmp_path / "plain.png"))
    legend = Image.open(save_overlays(images, truth, pred, PALETTE, tmp_path / "legend.png", names=NAMES))
    assert legend.width == plain.width and legend.height > plain.height
    strip = legend.crop((0, plain.height, legend.width, legend.height))
    colours = _colours(strip)
    # classes 0 and 2 appear, so their swatches are drawn; 1 and 3 do not, so theirs are not
    assert (255, 0, 0) in colours and (0, 0, 255) in colours
    assert (0, 255, 0) not in colours and (255, 255, 0) not in colours
    # the grid above the legend is the same image as without one
    assert np.array_equal(np.asarray(legend.crop((0, 0, plain.width, plain.height))), np.asarray(plain))
