"""Bad input to pre-training that must fail before any Ray work starts."""

import pytest
import torch

from conftest import tiny_run
from rsseg.errors import CheckpointError, ConfigError, DataError
from rsseg.pretrain import launch, store


def test_no_unlabeled_tiles(workdir):
    run = tiny_run(data={"synthetic": {"unlabeled_scenes": 0}}, pretrain={"homogeneous": ["unlabeled"]})
    with pytest.raises(DataError, match=r"no unlabeled tiles for step-2 pre-training in synthetic \(pretrain.homogeneous = \['unlabeled'\]\)"):
        launch.train(run, workdir)


def test_archive_iterations_without_archive_imagery(workdir):
    run = tiny_run(pretrain={"archive": {"source": "none"}})
    with pytest.raises(DataError, match=r"asks for 12 archive iterations but there is no archive imagery"):
        launch.train(run, workdir)


def test_batch_not_divisible_by_workers(workdir):
    run = tiny_run(pretrain={"batch_size": 5})
    with pytest.raises(ConfigError, match=r"pretrain.batch_size: 5 is not divisible by 2 workers"):
        launch.train(run, workdir)


def test_resume_from_a_checkpoint_of_another_spec_is_refused(workdir, tmp_path):
    run = tiny_run()
    other = store.save(tmp_path / "step_00000004.pt", {"model": {}, "step": 4}, "0123456789abcdef", 4)
    with pytest.raises(CheckpointError, match=rf"fingerprint 0123456789abcdef, but this spec's fingerprint is {run.pretrain_fingerprint}; refusing to resume"):
        launch.train(run, workdir, resume_from=other)
