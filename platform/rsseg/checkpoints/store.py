"""The fingerprinted checkpoint store: persistence only (find, write, verify). One directory per
pre-training fingerprint (`rsseg.checkpoints.identity`); what to train and when is decided by
`rsseg.pretrain.ensure`, the training itself is `rsseg.pretrain.launch`.

Layout under ``<workdir>/checkpoints/pretrain/<method>-<fingerprint>/``::

    spec.json                      the resolved run spec and the identity that was hashed
    ckpt/step_00001000.pt          periodic checkpoints (model, EMA, optimiser, step, data
    ckpt/step_00001000.json        position, RNG states, spec, git commit) + their manifests
    final.pt                       model + EMA + objective description, for feature extraction
    DONE.json                      written last: the pre-training is finished and final.pt valid

Every file is written atomically (temporary file, fsync, rename) and a checkpoint counts only
with its manifest (size + SHA-256). A truncated or corrupt checkpoint is never loaded: the
previous valid one is used instead, with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsseg import storage
from rsseg.atomic import atomic_path, atomic_write_text, sha256_file
from rsseg.errors import CheckpointError
from rsseg.provenance import canonical_json, stamp
from rsseg.workdir import Workdir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreDir:
    root: Path

    @classmethod
    def for_run(cls, run, workdir: Workdir | None = None) -> "StoreDir":
        workdir = workdir or Workdir.resolve()
        return cls(workdir.checkpoints / "pretrain" / f"{run.method}-{run.pretrain_fingerprint}")

    @property
    def fingerprint(self) -> str:
        return self.root.name.rsplit("-", 1)[1]

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def final(self) -> Path:
        return self.root / "final.pt"

    @property
    def done(self) -> Path:
        return self.root / "DONE.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def lock(self) -> Path:
        return self.root.with_name(self.root.name + ".lock")


# ----------------------------------------------------------------------------------------------
# Checkpoint files


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save(path: Path, state: dict[str, Any], fp: str, step: int) -> Path:
    """torch.save atomically, then its manifest (size + SHA-256) atomically: a checkpoint
    without a valid manifest does not exist."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    manifest = {"fingerprint": fp, "step": step, "size": path.stat().st_size, "sha256": sha256_file(path), **stamp()}
    atomic_write_text(_manifest_path(path), json.dumps(manifest, indent=2))
    storage.push(path)  # object storage: the checkpoint, then its manifest (a reader needs both)
    storage.push(_manifest_path(path))
    return path


def validate(path: Path) -> dict[str, Any]:
    """The manifest of a complete, uncorrupted checkpoint; CheckpointError otherwise."""
    mpath = _manifest_path(path)
    storage.pull(mpath)  # object storage: read through the local copy (fetched once)
    storage.pull(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not mpath.exists():
        raise CheckpointError(f"{path}: no manifest {mpath.name} (an interrupted write); not loading it")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{mpath}: manifest is not valid JSON; not loading {path.name}") from None
    size = path.stat().st_size
    if size != manifest.get("size"):
        raise CheckpointError(f"{path}: truncated or overwritten ({size} bytes, manifest says {manifest.get('size')}); not loading it")
    if sha256_file(path) != manifest.get("sha256"):
        raise CheckpointError(f"{path}: content does not match its SHA-256 in {mpath.name}; not loading it")
    return manifest


def load(path: Path, expected_fp: str | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    manifest = validate(path)
    if expected_fp is not None and manifest["fingerprint"] != expected_fp:
        raise CheckpointError(
            f"{path}: checkpoint was written for pre-training fingerprint {manifest['fingerprint']}, "
            f"but this spec's fingerprint is {expected_fp}; refusing to resume from it"
        )
    return torch.load(path, map_location=map_location, weights_only=True)


def checkpoints(store: StoreDir | None, directory: Path | None = None) -> list[tuple[int, Path]]:
    """(step, path) of the ``step_*.pt`` files of a store's ckpt/ (or of ``directory``), by step."""
    out = []
    directory = directory if directory is not None else store.ckpt
    storage.pull(directory)  # object storage: the checkpoints another node wrote
    for p in directory.glob("step_*.pt"):
        try:
            out.append((int(p.stem.split("_")[1]), p))
        except (IndexError, ValueError):
            continue
    return sorted(out)


def latest_valid(store: StoreDir, expected_fp: str, skipped: list[str] | None = None) -> tuple[int, Path] | None:
    """The newest checkpoint that validates; invalid ones are reported (logged, and appended to
    ``skipped`` for the caller to show) and skipped."""
    for step, path in reversed(checkpoints(store)):
        try:
            manifest = validate(path)
        except CheckpointError as exc:
            why = f"skipping checkpoint: {exc}"
        else:
            if manifest["fingerprint"] == expected_fp:
                return step, path
            why = f"skipping {path}: fingerprint {manifest['fingerprint']} != {expected_fp}"
        log.warning("%s", why)
        if skipped is not None:
            skipped.append(why)
    return None


# ----------------------------------------------------------------------------------------------
# Trunk points: full training states at switch steps, shared by the runs of one trunk
# (`rsseg.checkpoints.identity`): ``<workdir>/checkpoints/pretrain/trunks/<method>-<trunk>/step_N.pt``


def trunk_dir(workdir: Workdir, method: str, trunk: str) -> Path:
    return workdir.checkpoints / "pretrain" / "trunks" / f"{method}-{trunk}"


def trunk_point(tdir: Path, step: int) -> Path:
    return tdir / f"step_{step:08d}.pt"


def trunk_points(tdir: Path, trunk: str, at_most: int | None = None, verify: bool = True) -> list[int]:
    """Steps with a complete, valid trunk point (a torn or foreign one is skipped with a warning).
    Without ``verify`` (planning), the manifest and size are checked but not the SHA-256."""
    out = []
    for step, path in checkpoints(None, directory=tdir):  # (object storage: fetches the points another node left)
        if at_most is not None and step > at_most:
            continue
        try:
            manifest = validate(path) if verify else _quick_manifest(path)
        except CheckpointError as exc:
            log.warning("skipping trunk point: %s", exc)
            continue
        if manifest["fingerprint"] == trunk:
            out.append(step)
    return out


def _quick_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(_manifest_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: no readable manifest") from None
    if not path.exists() or path.stat().st_size != manifest.get("size"):
        raise CheckpointError(f"{path}: truncated or missing")
    return manifest


def latest_trunk_point(tdir: Path, trunk: str, at_most: int, verify: bool = True) -> tuple[int, Path] | None:
    """The newest valid point at or before ``at_most`` (a torn newer one is passed over)."""
    for step in reversed(trunk_points(tdir, trunk, at_most, verify=False)):
        path = trunk_point(tdir, step)
        if not verify:
            return step, path
        try:
            if validate(path)["fingerprint"] == trunk:
                return step, path
        except CheckpointError as exc:
            log.warning("skipping trunk point: %s", exc)
    return None


def prune(store: StoreDir, keep: int) -> None:
    for _, path in checkpoints(store)[:-keep]:
        for p in (path, _manifest_path(path)):
            p.unlink(missing_ok=True)
            storage.remove(p)


# ----------------------------------------------------------------------------------------------
# Finished pre-trainings


@dataclass(frozen=True)
class Pretrained:
    """A finished pre-training: what encoders load."""

    path: Path
    fingerprint: str
    method: str
    mlflow_run_id: str | None = None

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return load(self.path, self.fingerprint, map_location)


def find(run, workdir: Workdir | None = None) -> Pretrained | None:
    store = StoreDir.for_run(run, workdir)
    storage.pull(store.done, fresh=True)  # object storage: finished elsewhere? (a rebuilt one rewrites it)
    if not store.done.exists():
        return None
    storage.pull(_manifest_path(store.final), fresh=True)
    storage.pull(store.final, fresh=_size_differs(store.final))
    try:
        done = json.loads(store.done.read_text())
        validate(store.final)
    except (CheckpointError, json.JSONDecodeError) as exc:
        log.warning("pre-training %s is marked done but unusable (%s); it will be retrained", store.root, exc)
        return None
    return Pretrained(store.final, store.fingerprint, run.method, done.get("mlflow_run_id"))


def _size_differs(path: Path) -> bool:
    """A local copy whose size is not its manifest's (a pre-training rebuilt elsewhere): fetch again."""
    try:
        return path.stat().st_size != json.loads(_manifest_path(path).read_text()).get("size")
    except (OSError, ValueError):
        return True


def done_run_id(store: StoreDir) -> str | None:
    """The MLflow run named by a DONE.json (a pre-training that finished; asked when its final.pt
    is being rebuilt), or None."""
    storage.pull(store.done, fresh=True)
    try:
        return json.loads(store.done.read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None


def finalize(store: StoreDir, state: dict[str, Any], mlflow_run_id: str | None) -> Pretrained:
    final = {k: state[k] for k in ("model", "ema", "objective", "spec", "step", "fingerprint", "method", "git_commit", "rsseg_version") if k in state}
    save(store.final, final, store.fingerprint, state["step"])
    atomic_write_text(store.done, json.dumps({"fingerprint": store.fingerprint, "step": state["step"], "mlflow_run_id": mlflow_run_id,
                                              "resumed_from": state.get("resumed_from", 0), **stamp()}, indent=2))
    storage.push(store.done)  # written last: a reader that sees it finds final.pt there
    return Pretrained(store.final, store.fingerprint, state.get("method", store.root.name.rsplit("-", 1)[0]), mlflow_run_id)


def write_spec(store: StoreDir, run, identity: dict[str, Any]) -> None:
    """spec.json: the resolved run and the identity its fingerprint hashes."""
    store.root.mkdir(parents=True, exist_ok=True)
    body = {"identity": identity, "run": run.model_dump(mode="json"), **stamp()}
    atomic_write_text(store.root / "spec.json", json.dumps(json.loads(canonical_json(body)), indent=2))
    storage.push(store.root / "spec.json")


# ----------------------------------------------------------------------------------------------
# Imported weights: released checkpoints converted once, kept under a name


def imported_dir(workdir: Workdir, name: str) -> StoreDir:
    return StoreDir(workdir.checkpoints / "imported" / name)


def find_imported(workdir: Workdir, name: str) -> Pretrained | None:
    """Imported weights by name (None when there are none of that name)."""
    sdir = imported_dir(workdir, name)
    storage.pull(sdir.done)  # object storage: imported on another machine
    if not sdir.done.exists():
        return None
    done = json.loads(sdir.done.read_text())
    validate(sdir.final)
    return Pretrained(sdir.final, done["fingerprint"], done["method"], None)


def imported(name: str, workdir: Workdir | None = None) -> Pretrained:
    """The imported weights ``name`` (a one-line error saying how to import them when absent)."""
    workdir = workdir or Workdir.resolve()
    found = find_imported(workdir, name)
    if found is None:
        have = ", ".join(d["name"] for d in list_imported(workdir)) or "none"
        raise CheckpointError(f"weights {name!r} are not imported in {workdir.root} (imported: {have}); "
                              f"run `platform weights import PATH --format ... --name {name}`")
    return found


def imported_fingerprint(workdir: Workdir, name: str) -> str | None:
    """The content fingerprint of imported weights (what a run that uses them depends on)."""
    sdir = imported_dir(workdir, name)
    storage.pull(sdir.done)
    try:
        return json.loads(sdir.done.read_text())["fingerprint"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


def write_imported(workdir: Workdir, name: str, method: str, state: dict[str, Any], source: dict[str, Any]) -> Pretrained:
    """Store converted weights under ``name``: final.pt (+ manifest), then DONE.json (last) with
    where they came from. The fingerprint is the source file's hash: a re-import of the same
    file is the same weights."""
    sdir = imported_dir(workdir, name)
    fp = "import-" + source["sha256"][:16]
    save(sdir.final, {**state, "fingerprint": fp, "method": method, "source": source, **stamp()}, fp, 0)
    # the network and schedule beside the weights: planning reads them without loading the file
    about = {k: state[k] for k in ("objective", "trained_schedule", "notes") if state.get(k) is not None}
    atomic_write_text(sdir.done, json.dumps({"fingerprint": fp, "method": method, "name": name, **source, **about, **stamp()}, indent=2))
    storage.push(sdir.done)
    return Pretrained(sdir.final, fp, method, None)


def imported_objective(workdir: Workdir, name: str) -> dict[str, Any] | None:
    """The network and schedule (``objective``) of imported weights, or None when not imported;
    read from DONE.json (an import made before it was written there: from final.pt)."""
    sdir = imported_dir(workdir, name)
    storage.pull(sdir.done)
    try:
        done = json.loads(sdir.done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if "objective" in done:
        return done["objective"]
    found = find_imported(workdir, name)
    return found.load()["objective"] if found is not None else None


def list_imported(workdir: Workdir) -> list[dict[str, Any]]:
    root = workdir.checkpoints / "imported"
    storage.pull(root, pattern="*/DONE.json")
    out = []
    for done in sorted(root.glob("*/DONE.json")) if root.exists() else []:
        try:
            out.append(json.loads(done.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out
