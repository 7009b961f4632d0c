"""Fine-tuning: frozen means frozen, resume continues, the run is tracked with its artifacts."""

import pytest
import torch

from conftest import install_plugin, tiny_run
from rsseg import finetune, runner, tracking
from rsseg.encoders import count_parameters
from rsseg.heads.mlp import segmentor_parameters


def random_features_run(**over):
    """The DDPM encoder with random weights: no pre-training (and no Ray) needed."""
    return tiny_run(ddpm={"features": {"weights": "random", "timesteps": [0, 50], "resolutions": [16, 8, 4, 2]}}, **over)


def _spy_prepare(monkeypatch) -> dict:
    """Record the Prepared of the next run and its encoder weights before training."""
    seen = {}
    original = finetune.prepare

    def spy(*a, **k):
        p = original(*a, **k)
        seen["p"], seen["before"] = p, {k: v.clone() for k, v in p.encoder.state_dict().items()}
        return p

    monkeypatch.setattr(finetune, "prepare", spy)
    return seen


def test_frozen_encoder_is_bit_identical_and_gets_no_gradients(workdir, monkeypatch):
    """The trained run's own encoder: nothing requires grad, no gradient reaches it, its weights
    after training equal those before; only the head trains (its size by the closed form)."""
    run = random_features_run(finetune={"iterations": 4, "eval_every": 2})
    seen = _spy_prepare(monkeypatch)
    result = finetune.run(run, workdir)
    p = seen["p"]
    assert not any(q.requires_grad for q in p.encoder.parameters())
    assert all(q.grad is None for q in p.encoder.parameters())
    after = p.encoder.state_dict()
    assert seen["before"].keys() == after.keys() and all(torch.equal(seen["before"][k], after[k]) for k in after)
    assert any(q.grad is not None for q in p.head.parameters())
    assert result.trainable_params == count_parameters(p.head) == segmentor_parameters(p.encoder.feature_info, p.table.num_classes)


def test_full_fine_tuning_updates_the_encoder(workdir, monkeypatch):
    run = random_features_run(finetune={"iterations": 3, "eval_every": 3, "frozen": False, "head": "mlp"})
    seen = _spy_prepare(monkeypatch)
    result = finetune.run(run, workdir)
    p = seen["p"]
    changed = [k for k, v in p.encoder.state_dict().items() if not torch.equal(seen["before"][k], v)]
    assert changed
    assert result.trainable_params == count_parameters(p.head) + count_parameters(p.encoder)


def test_resume_from_an_eval_checkpoint_equals_the_uninterrupted_run(workdir):
    run = random_features_run(finetune={"iterations": 8, "eval_every": 4, "augment": {"stretch": False}})
    states = []
    full = finetune.run(run, workdir, on_eval=lambda it, m, s: states.append((it, {k: v for k, v in s.items()})))
    assert [it for it, _ in states] == [4, 8]
    resumed = finetune.run(run, workdir, resume_state=states[0][1])
    assert resumed.test.miou == full.test.miou
    assert (resumed.test.matrix == full.test.matrix).all()


def test_tracked_run_logs_metrics_per_class_iou_and_artifacts(workdir):
    run = random_features_run(finetune={"iterations": 4, "eval_every": 2})
    result, tracker = runner.execute(run, workdir, profile="test")
    c = tracking.client(tracker.uri)
    r = c.get_run(tracker.run_id)
    assert r.info.status == "FINISHED"
    m = r.data.metrics
    assert m["test/mIoU"] == pytest.approx(result.test.miou)
    abbrs = result.class_abbrs
    assert {f"test/IoU/{a}" for a, v in zip(abbrs, result.test.iou) if v == v} <= set(m)
    assert {"val/mIoU", "train/loss", "params/trainable", "time/total_s"} <= set(m)
    assert r.data.tags["method"] == "ddpm" and r.data.tags["frozen"] == "true" and r.data.tags["timesteps"] == "0,50"
    arts = set(tracking.list_artifacts(tracker.uri, tracker.run_id))
    assert {"confusion_matrix.png", "metrics.json", "config.yaml", "predictions.png"} <= arts
    assert r.data.params["finetune.iterations"] == "4"
    # Only the active blocks: this DDPM run on synthetic data with the MLP head.
    params = set(r.data.params)
    assert len(params) <= 90, len(params)
    assert not {p for p in params if p.startswith(("convnext", "mae.", "scalemae", "data.gid.", "finetune.upernet.", "pretrain.runtime."))}
    assert {"ddpm.features.timesteps", "data.synthetic.scenes", "finetune.mlp.grouping"} <= params


def test_non_finite_loss_fails_the_run_with_the_reason(workdir):
    run = random_features_run(finetune={"iterations": 30, "eval_every": 30, "lr": 1e30})
    with pytest.raises(finetune.NonFiniteLoss, match=r"fine-tuning loss is (nan|inf) at iteration \d+"):
        runner.execute(run, workdir)
    c = tracking.client(tracking.resolve_uri(None, workdir))
    exp = c.get_experiment_by_name(tracking.FINETUNE_EXPERIMENT)
    failed = c.search_runs([exp.experiment_id])
    assert failed[0].info.status == "FAILED" and "NonFiniteLoss" in failed[0].data.tags["error"]


USER_HEAD = '''
import torch
import torch.nn.functional as F

from rsseg.heads import SegHead


class TinyConv(SegHead):
    """Every map upsampled to the tile and concatenated, then one 1x1 convolution."""

    def __init__(self, feature_info, num_classes):
        super().__init__()
        self.proj = torch.nn.Conv2d(sum(f.channels for f in feature_info), num_classes, 1)

    def forward(self, features, size):
        up = [F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in features]
        return self.proj(torch.cat(up, dim=1))


def build(feature_info, num_classes, finetune):
    return TinyConv(feature_info, num_classes)
'''


def test_a_head_from_an_installed_package_is_chosen_from_yaml_and_fine_tunes(workdir, tmp_path, monkeypatch):
    from rsseg import heads
    from rsseg.errors import ConfigError
    from rsseg.runspec import load_run

    doc = tmp_path / "run.yaml"
    doc.write_text("method: ddpm\nfinetune:\n  head: tiny_conv\n")
    # negative control: not installed, the name is refused with the heads there are
    with pytest.raises(ConfigError, match=r"run.yaml: finetune.head: unknown head 'tiny_conv'; expected auto or one of mlp, segformer, upernet$"):
        load_run(doc)
    (tmp_path / "site").mkdir()
    install_plugin(tmp_path / "site", monkeypatch, "my_heads", USER_HEAD, "rsseg.heads", "tiny_conv = my_heads:build")
    heads._installed.cache_clear()  # installed after this process read the entry points (pip runs before a process starts)
    try:
        assert load_run(doc).spec.head_name == "tiny_conv"
        run = random_features_run(finetune={"head": "tiny_conv", "iterations": 4, "eval_every": 2})
        assert "mlp" not in run.active_config()["finetune"] and "upernet" not in run.active_config()["finetune"]
        seen = _spy_prepare(monkeypatch)
        result = finetune.run(run, workdir)
        assert type(seen["p"].head).__module__ == "my_heads"
        assert result.trainable_params == count_parameters(seen["p"].head) > 0
        assert 0 <= result.test.miou <= 1
    finally:
        heads._installed.cache_clear()
