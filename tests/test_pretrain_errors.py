"""Bad input to pre-training that must fail before any Ray work starts."""

import pytest
import torch

from conftest import tiny_run
from rsseg.errors import CheckpointError, ConfigError, DataError
from rsseg.checkpoints import store
from rsseg.pretrain import launch


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


def test_too_little_free_space_fails_before_anything_starts(workdir, monkeypatch):
    from rsseg import diskspace, tracking
    from rsseg.errors import DiskFullError

    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 3 * diskspace.MB)
    with pytest.raises(DiskFullError, match=r"^no space left on .*/checkpoints/pretrain/ddpm-[0-9a-f]+: pre-training [0-9a-f]{8} "
                                            r"\(3 checkpoints \+ final\) needs ~\d+ MB, 3 MB free; free space there"):
        launch.train(tiny_run(), workdir)
    c = tracking.client(tracking.resolve_uri(None, workdir))
    exp = c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT)
    assert exp is None or not c.search_runs([exp.experiment_id])  # no MLflow run opened


def test_more_workers_than_the_cluster_holds_is_refused_before_an_mlflow_run_opens(workdir, monkeypatch):
    """One line, and no MLflow run left RUNNING (the refusal used to come after the run was opened)."""
    from rsseg import raycluster, tracking

    monkeypatch.setattr(raycluster, "init", lambda *a, **k: None)  # a 2-CPU cluster, no Ray started
    monkeypatch.setattr(raycluster, "total_cpus", lambda: 2.0)
    monkeypatch.setattr(raycluster, "total_gpus", lambda: 0.0)
    monkeypatch.setattr(raycluster, "largest_node", lambda r="CPU": 2.0 if r == "CPU" else 0.0)
    with pytest.raises(ConfigError, match=r"^pretrain.runtime.workers: 8 workers need 8 CPUs, the Ray cluster has 2$"):
        launch.train(tiny_run(pretrain={"batch_size": 8, "runtime": {"workers": 8}}), workdir)
    c = tracking.client(tracking.resolve_uri(None, workdir))
    exp = c.get_experiment_by_name(tracking.PRETRAIN_EXPERIMENT)
    assert exp is None or not c.search_runs([exp.experiment_id])


def test_errors_no_retry_can_fix_are_recognised_through_wrappers():
    import errno

    from rsseg.errors import DataError, disk_full_path, is_fatal

    enospc = OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/x/ckpt/step_00000006.pt")
    try:
        try:
            raise enospc
        except OSError as e:
            raise RuntimeError("Training failed due to worker errors") from e
    except RuntimeError as wrapped:
        assert disk_full_path(wrapped) == "/w/checkpoints/x/ckpt/step_00000006.pt" and is_fatal(wrapped)
    remote = RuntimeError("Traceback (most recent call last):\n  ...\nOSError: [Errno 28] No space left on device: '/w/mlflow.db'")
    assert disk_full_path(remote) == "/w/mlflow.db"
    assert is_fatal(DataError("x.tif: truncated")) and not is_fatal(RuntimeError("CUDA error: an illegal memory access"))


def test_error_tags_hold_the_root_cause_not_a_traceback_or_a_wrapper():
    import errno

    from rsseg.errors import DiskFullError
    from rsseg.tracking import error_reason

    def chained(outer, inner):
        try:
            try:
                raise inner
            except BaseException as e:
                raise outer from e
        except BaseException as wrapped:
            return wrapped

    assert error_reason(chained(RuntimeError("Training failed due to worker errors:"), ValueError("bad tile"))) == "ValueError: bad tile"
    remote = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\nFloatingPointError: pre-training loss is nan at step 7")
    assert error_reason(remote) == "FloatingPointError: pre-training loss is nan at step 7"
    ours = chained(DiskFullError("no space left on /w/ckpt (pre-training ab12cd34)"), OSError(errno.ENOSPC, "No space left on device"))
    assert error_reason(ours) == "DiskFullError: no space left on /w/ckpt (pre-training ab12cd34)"
