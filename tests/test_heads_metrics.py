"""Heads (parameter counts, shapes) and metrics (against hand-computed confusion matrices)."""

import numpy as np
import pytest
import torch

from rsseg.encoders import FeatureInfo
from rsseg.heads.mlp import MlpSegmentor, block_parameters, segmentor_parameters
from rsseg.heads.upernet import UperNetSegHead
from rsseg.metrics import ConfusionMatrix, SegMetrics

INFO = [FeatureInfo(c, s, f"up{i}.{j}", f"up{i}.{j}@t{t}")
        for t in (50, 100, 150) for i, (c, s) in enumerate([(128, 16), (64, 8), (64, 4), (32, 2)]) for j in range(3)]


def feats(info, b=2, size=64):
    return [torch.randn(b, fi.channels, size // fi.stride, size // fi.stride) for fi in info]


@pytest.mark.parametrize("grouping", ["map", "resolution"])
def test_mlp_segmentor_parameter_count_matches_closed_form(grouping):
    head = MlpSegmentor(INFO, num_classes=12, grouping=grouping)
    assert sum(p.numel() for p in head.parameters()) == segmentor_parameters(INFO, 12, grouping)


def test_mlp_closed_form_by_hand():
    # one map of c = 128 at 3 timesteps: block 384 -> 128
    c_in, c_out = 384, 128
    assert block_parameters(c_in, c_out) == 2 * (384 * 384 + 384) + 4 * 384 + 384 * 128 + 128
    # the "map" reading: 12 blocks (3c -> c) + final; the "resolution" reading: 4 blocks (9c -> c) + final
    per_map = sum(3 * block_parameters(3 * c, c) for c in (128, 64, 64, 32)) + block_parameters(3 * (128 + 64 + 64 + 32), 12)
    per_res = sum(block_parameters(9 * c, c) for c in (128, 64, 64, 32)) + block_parameters(128 + 64 + 64 + 32, 12)
    assert segmentor_parameters(INFO, 12, "map") == per_map
    assert segmentor_parameters(INFO, 12, "resolution") == per_res


def test_mlp_block_is_the_papers_residual_form():
    from rsseg.heads.mlp import MlpBlock

    blk = MlpBlock(6, 2).eval()
    f = torch.randn(1, 6, 3, 3)
    z1 = torch.relu(blk.bn1(blk.linear1(f) + f))
    z2 = torch.relu(blk.bn2(blk.linear2(z1) + z1))
    assert torch.allclose(blk(f), blk.linear3(z2))


@pytest.mark.parametrize("head_cls", [MlpSegmentor, UperNetSegHead])
def test_heads_output_full_resolution_logits(head_cls):
    head = head_cls(INFO, 7) if head_cls is MlpSegmentor else head_cls(INFO, 7, channels=32, auxiliary=True)
    f = feats(INFO)
    out = head(f, (64, 64))
    assert out.shape == (2, 7, 64, 64)
    loss = out.logsumexp(1).mean()
    if isinstance(head, UperNetSegHead):
        aux = head.auxiliary_logits(f, (64, 64))
        assert aux.shape == (2, 7, 64, 64)
        loss = loss + aux.logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_confusion_matrix_by_hand_with_ignored_tile_and_absent_class():
    cm = ConfusionMatrix(4)
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    cm.update(pred, truth)
    cm.update(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 255))  # an all-ignored tile adds nothing
    want = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert np.array_equal(cm.matrix.numpy(), want)
    m = cm.compute()
    # IoU: c0 1/(1+1+1)=1/3, c1 2/(2+1)=2/3, c2 1/(1+1)=1/2, c3 absent from truth and prediction -> NaN, not averaged
    np.testing.assert_allclose(m.iou[:3], [1 / 3, 2 / 3, 1 / 2])
    assert np.isnan(m.iou[3])
    assert m.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m.pixel_accuracy == pytest.approx(4 / 6)
    d = m.as_dict(["a", "b", "c", "d"], prefix="val/")
    assert "val/IoU/d" not in d and d["val/mIoU"] == pytest.approx(0.5)


def test_miou_accumulates_over_the_split_not_per_tile():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # tile 1
    cm.update(torch.tensor([1]), torch.tensor([1]))  # tile 2
    m = cm.compute()
    # accumulated: c0 3/(3+1)=0.75, c1 1/(1+1)=0.5 -> 0.625 (per-tile averaging would differ)
    assert m.miou == pytest.approx(0.625)


def test_predicted_but_absent_class_counts_as_zero():
    m = SegMetrics.from_matrix(np.array([[2, 1], [0, 0]]))
    assert m.iou[1] == 0.0 and m.miou == pytest.approx((2 / 3 + 0) / 2)
