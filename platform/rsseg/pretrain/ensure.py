"""Find or train: the one decision of whether a run's pre-training has to happen.

`ensure_pretrained` returns the finished pre-training of a run from the store, or trains it now
(once: concurrent callers with one fingerprint in this process wait on a lock, other processes
on a file lock, and whoever comes second finds the first one's result). It has one caller per
path: ``platform pretrain`` / ``finetune`` / ``viz`` (the CLI), the sweep driver (before any
trial starts) and the sweep trial (which then only ever finds it).
"""

from __future__ import annotations

import threading
from typing import Any

from rsseg import resolved
from rsseg.errors import CheckpointError
from rsseg.checkpoints import store
from rsseg.workdir import Workdir

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(key: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(key, threading.Lock())


def ensure_pretrained(run, workdir: Workdir | None = None, *, allow_training: bool = True,
                      **train_kwargs: Any) -> store.Pretrained | None:
    """The finished pre-training for ``run`` (None when its method needs none): found in the
    store, or trained now, once. Without ``allow_training`` (a sweep trial, fine-tuning, feature
    pictures: they hold no resources for a pre-training) a missing one is a one-line error that
    says how to make it. ``train_kwargs`` go to `rsseg.pretrain.launch.train`. ``run``: the
    resolved run (a bare spec is resolved here, with ``train_kwargs``' profile)."""
    from filelock import FileLock

    res = resolved.of(run, train_kwargs.pop("profile", None))
    run = res.spec
    workdir = workdir or Workdir.resolve()
    if res.pretraining is None:
        return None
    found = store.find(run, workdir)
    if found is not None:
        return found
    sdir = store.StoreDir.for_run(run, workdir)
    if not allow_training:
        raise CheckpointError(
            f"pre-training {res.fingerprint} ({run.method}) is not in the store {sdir.root}; train it first with "
            "`platform pretrain` (or run `platform finetune` / the sweep, which train it before fine-tuning)"
        )
    sdir.root.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(str(sdir.root)), FileLock(str(sdir.lock)):
        found = store.find(run, workdir)  # someone else may have finished while we waited
        if found is not None:
            return found
        from rsseg.pretrain.launch import train

        trained = train(res, workdir, **train_kwargs)
        if trained is None:
            raise CheckpointError(f"pre-training {res.fingerprint} was stopped before its last step")
        return trained
