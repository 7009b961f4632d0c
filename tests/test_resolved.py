"""A run is resolved once (`rsseg.resolved`): the stages below derive nothing from it, it travels
to a Ray worker or a Tune trial as it is, and its tags are a pure function of it."""

import pickle

import pytest

from conftest import tiny_run
from rsseg import runner, tracking
from rsseg.resolved import ResolvedRun, resolve


def _one_worker_run():
    """Pre-trained in Ray Train's local mode (one worker, this process): no cluster needed."""
    return tiny_run(pretrain={"iterations": {"archive": 4, "homogeneous": 4}, "runtime": {"workers": 1}},
                    finetune={"iterations": 4, "eval_every": 2})


def _derivations_raise(monkeypatch) -> None:
    """Every function that derives a run's values from its spec fails when called."""
    import rsseg.checkpoints.identity as identity
    import rsseg.resolved as resolved
    from rsseg.runspec import run_spec_model

    def derived(*a, **k):
        raise AssertionError("derived again below the resolve step")

    for module, name in ((resolved, "resolve"), (resolved, "trial_key"), (identity, "lineage"), (identity, "identity"),
                         (identity, "trunk_identity")):
        monkeypatch.setattr(module, name, derived)
    monkeypatch.setattr(run_spec_model(), "head_name", property(derived))
    monkeypatch.setattr(run_spec_model(), "model_validate", classmethod(derived))


def test_the_stages_derive_nothing_from_a_resolved_run(workdir, monkeypatch):
    from rsseg.pretrain.ensure import ensure_pretrained

    res = resolve(_one_worker_run(), "test")
    _derivations_raise(monkeypatch)
    pretrained = ensure_pretrained(res, workdir)  # trains: the launch, its MLflow run, the worker loop
    assert pretrained.fingerprint == res.fingerprint
    result, tracker = runner.execute(res, workdir, pretrained=pretrained)  # fine-tunes, tracked
    tags = tracking.client(tracker.uri).get_run(tracker.run_id).data.tags
    assert tags["pretrain_fingerprint"] == res.fingerprint and tags["profile"] == "test" and tags["head"] == res.head
    assert result.head == res.head and len(result.val_history) == 2
    # negative control: a bare spec is resolved at the stage's entry, which is a derivation
    with pytest.raises(AssertionError, match="derived again below the resolve step"):
        runner.execute(res.spec, workdir, pretrained=pretrained)


def test_a_resolved_run_pickles_by_reference_and_keeps_what_was_derived(monkeypatch):
    from rsseg.runspec import run_spec_model

    res = resolve(tiny_run(data={"label_ratio": 0.4}), "smoke")
    tags = res.tags("finetune").to_tags()
    blob = pickle.dumps(res)
    assert len(blob) < 16_000  # the spec's class travels by name, not by value
    _derivations_raise(monkeypatch)
    back = pickle.loads(blob)
    assert isinstance(back, ResolvedRun) and type(back.spec) is run_spec_model() and back == res
    assert back.tags("finetune").to_tags() == tags  # nothing recomputed on the other side


def test_tags_are_a_pure_function_of_the_resolved_run():
    run = tiny_run(pretrain={"iterations": {"total": 7, "homogeneous_ratio": 0.5, "archive": None, "homogeneous": None}},
                   data={"label_ratio": 0.02}, seed=3)
    res = resolve(run, "paper")
    tags = res.tags("finetune", sweep="s", trial_slot="0.0").to_tags()
    assert res.tags("finetune", sweep="s", trial_slot="0.0").to_tags() == tags
    assert {k: tags[k] for k in ("label_ratio", "homogeneous_share", "seed", "profile", "sweep", "trial_slot", "timesteps")} == {
        "label_ratio": "0.02", "homogeneous_share": "0.5", "seed": "3", "profile": "paper", "sweep": "s", "trial_slot": "0.0",
        "timesteps": "0,50"}
    assert tags["pretrain_fingerprint"] == res.fingerprint == run.pretrain_fingerprint
    assert tags["switch_step"] == str(res.pretraining.lineage.switch) == "3"
    pre = res.tags("pretrain").to_tags()
    assert not {"label_ratio", "seed", "frozen"} & set(pre)  # a pre-training has none of the fine-tuning's
    no_pretraining = resolve(tiny_run(ddpm={"features": {"weights": "random"}}))
    assert no_pretraining.pretraining is None and "pretrain_fingerprint" not in no_pretraining.tags("finetune").to_tags()
