"""SegFormer-B4 as a runnable method: transformers' MiT encoder on the feature contract and its
all-MLP decoder as the ``segformer`` head; Tables 4-5 get a row of ours beside the published one."""

import pytest
import torch

from conftest import tiny_run
from rsseg import finetune
from rsseg.config.specs import FinetuneSpec
from rsseg.encoders import check_contract, count_parameters
from rsseg.errors import ConfigError
from rsseg.heads import build_head
from rsseg.heads.segformer import SegformerSegHead
from rsseg_baselines.segformer import encoder as segformer, rules as segformer_rules
from rsseg_baselines.segformer.encoder import SegformerEncoder
from rsseg_baselines.segformer.spec import SegformerSpec


def _reference(size: str, classes: int, hidden: int):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(num_channels=3, decoder_hidden_size=hidden, num_labels=classes, **segformer.SIZES[size])
    return SegformerForSemanticSegmentation(cfg)


def test_segformer_b4_counts_the_papers_64m_as_transformers_does():
    with torch.device("meta"):
        enc = SegformerEncoder(SegformerSpec(size="b4"), 3, "x", imagenet=False)
        head = SegformerSegHead(enc.feature_info, 12, hidden=768)
        ref = _reference("b4", 12, 768)
    ours = count_parameters(enc) + count_parameters(head)
    assert ours == sum(p.numel() for p in ref.parameters()) == 64_002_252
    assert round(ours / 1e6, 1) == 64.0  # the paper's Tables 4-5: 64.1 M


def test_encoder_and_head_equal_transformers_segformer_for_semantic_segmentation():
    """Same weights, same logits: our encoder's four maps through our head are transformers'
    SegformerForSemanticSegmentation (before its upsampling), so the row is SegFormer's."""
    torch.manual_seed(0)
    ref = _reference("pico", 5, 32).eval()
    enc = SegformerEncoder(SegformerSpec(size="pico", drop_path=0.0), 3, "x", imagenet=False).eval()
    head = SegformerSegHead(enc.feature_info, 5, hidden=32).eval()
    enc.mit.load_state_dict(ref.segformer.state_dict())
    head.head.load_state_dict(ref.decode_head.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = enc(x)
        check_contract(enc, x, feats)
        assert [fi.stride for fi in enc.feature_info] == [4, 8, 16, 32]
        assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
        torch.testing.assert_close(head(feats, (16, 16)), ref(pixel_values=x).logits)


def test_segformer_head_takes_any_four_scale_encoder():
    """The decoder is a head of the registry: several maps per stride are concatenated first."""
    from rsseg.encoders import FeatureInfo

    info = [FeatureInfo(8, 4, "a", "a"), FeatureInfo(8, 4, "b", "b"), FeatureInfo(16, 8, "c", "c"), FeatureInfo(32, 16, "d", "d")]
    head = build_head("segformer", info, 4, FinetuneSpec(segformer={"decoder_hidden_size": 16}))
    feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    assert head(feats, (64, 64)).shape == (2, 4, 64, 64)
    assert [m.proj.in_features for m in head.head.linear_projections] == [16, 16, 32]


def test_segformer_fine_tunes_with_a_falling_loss_and_reports_its_parameters(workdir, monkeypatch):
    run = tiny_run(method="segformer", segformer={"size": "pico"},
                   finetune={"frozen": False, "iterations": 30, "eval_every": 30, "lr": 1e-3, "augment": {"stretch": False}})
    assert run.finetune.head == "auto" and run.plugin.default_head(False) == "segformer"
    losses = []
    original = SegformerSegHead.loss

    def recording(self, features, logits, mask):
        loss = original(self, features, logits, mask)
        if self.training:
            losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(SegformerSegHead, "loss", recording)
    result = finetune.run(run, workdir)
    assert result.head == "segformer" and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    enc = SegformerEncoder(SegformerSpec(size="pico"), 3, "x", imagenet=False)
    head = SegformerSegHead(enc.feature_info, result.test.matrix.shape[0], hidden=768)
    assert result.trainable_params == count_parameters(enc) + count_parameters(head)


def _mit_dir(tmp_path, size="pico", name="mit"):
    from transformers import SegformerConfig, SegformerForImageClassification

    torch.manual_seed(3)
    model = SegformerForImageClassification(SegformerConfig(num_channels=3, num_labels=10, **segformer.SIZES[size]))
    out = tmp_path / name
    model.save_pretrained(out)
    return out, model


def test_imagenet_mit_weights_load_from_a_local_directory_with_asserted_keys(tmp_path):
    path, model = _mit_dir(tmp_path)
    run = tiny_run(method="segformer", segformer={"size": "pico", "weights": str(path)})
    enc = segformer.build(run)
    assert enc.imagenet and segformer_rules.tags(run) == {"backbone": "mit-pico", "weights": "imagenet"}
    for k, v in model.segformer.state_dict().items():
        assert torch.equal(enc.mit.state_dict()[k], v), k
    assert enc.cache_id != segformer.build(tiny_run(method="segformer", segformer={"size": "pico"})).cache_id


def test_wrong_mit_weights_are_one_line_naming_the_directory(tmp_path):
    b4_like = tmp_path / "b4"
    path, _ = _mit_dir(tmp_path)
    run = tiny_run(method="segformer", segformer={"size": "b4", "weights": str(path)})
    with pytest.raises(ConfigError, match=r"^segformer.weights: .*mit does not fit this SegFormer: .*segformer.size 'b4' with 3 bands expects"):
        segformer.build(run)
    b4_like.mkdir()
    (b4_like / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^segformer.weights: .*b4: not loadable as a SegFormer"):
        segformer.build(tiny_run(method="segformer", segformer={"size": "pico", "weights": str(b4_like)}))
    with pytest.raises(ValueError, match=r"segformer.weights: .*nope is not a directory"):  # at config time
        tiny_run(method="segformer", segformer={"weights": str(tmp_path / "nope")})
