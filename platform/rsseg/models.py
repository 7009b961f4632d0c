"""Trained segmentors out: every fine-tuning run saves what prediction needs, and loads back.

A saved model is a directory (written atomically: a temporary directory renamed onto the final
name, so a half-written model never carries it)::

    model.json   what the model is: the resolved run spec, the encoder reference (the
                 pre-training fingerprint, or the imported weights' name and fingerprint, or
                 "random"), whether the encoder was fine-tuned, the class table (names,
                 abbreviations, colours), bands, value range, tile size, head, test metrics,
                 git commit and version
    model.pt     the head's weights (and the neck's), and the encoder's when it was fine-tuned

It lives in ``<workdir>/models/<run id>/`` and is logged to the run's MLflow artifacts under
``model/``. ``runs:/<run id>`` finds it in either place; a frozen encoder is rebuilt from the
checkpoint store (an error names the fingerprint or weights name when they are missing).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsseg.errors import CheckpointError, ConfigError
from rsseg.workdir import Workdir

MODEL_VERSION = 1


def encoder_reference(run, pretrained) -> dict[str, Any]:
    """How to rebuild the run's encoder weights: from its pre-training, imported weights, or none."""
    block = run.method_block
    imported = getattr(getattr(block, "features", None), "imported", None)
    if imported:
        from rsseg.checkpoints.store import imported_fingerprint

        return {"kind": "imported", "name": imported, "fingerprint": imported_fingerprint(Workdir.resolve(), imported)}
    if pretrained is not None:
        return {"kind": "pretrained", "fingerprint": pretrained.fingerprint, "method": run.method}
    return {"kind": "none"}


def training_input(scenes) -> dict[str, Any]:
    """What the training imagery looked like, for prediction's warnings about other imagery: the
    dtype, the raw range mapped to [-1, 1] and the ground sample distance (metres, None when the
    first labelled scene has no projected CRS)."""
    from rsseg.data.pixels import default_value_range
    from rsseg.data.scenes import open_raster

    with open_raster(scenes.labelled[0].image) as src:
        dtype = src.dtypes[0]
        gsd = float(abs(src.transform.a)) if src.crs is not None and src.crs.is_projected else None
    value_range = list(scenes.value_range) if scenes.value_range else list(default_value_range(dtype))
    return {"dtype": dtype, "value_range": value_range, "gsd": gsd}


def save_model(out: Path, run, prepared, result, pretrained) -> Path:
    """Write the trained model of a fine-tuning run into ``out`` (atomically)."""
    from rsseg.atomic import current_umask
    from rsseg.provenance import stamp

    table = prepared.table
    meta = {
        "version": MODEL_VERSION,
        "run": run.model_dump(mode="json"),
        "method": run.method,
        "encoder": encoder_reference(run, pretrained) | {"finetuned": not prepared.frozen},
        "head": prepared.head_name,
        "classes": {"name": table.name, "names": table.names, "abbrs": table.abbrs,
                    "colors": [list(c) for c in table.palette().tolist()]},
        "num_classes": table.num_classes,
        "bands": list(prepared.index.scenes.bands) if prepared.index.scenes.bands else None,
        "in_channels": int(prepared.train[0]["image"].shape[0]),
        "value_range": list(prepared.index.scenes.value_range) if prepared.index.scenes.value_range else None,
        "input": training_input(prepared.index.scenes),
        "tile_size": run.data.tile_size,
        "dataset": run.data.dataset,
        "test": {"mIoU": result.test.miou, "pixel_accuracy": result.test.pixel_accuracy,
                 "IoU": {a: (None if v != v else float(v)) for a, v in zip(result.class_abbrs, result.test.iou)}},
        "trainable_params": result.trainable_params,
        **stamp(),
    }
    weights = {"head": {k: v.detach().cpu() for k, v in prepared.head.state_dict().items()}}
    if not prepared.frozen:
        weights["encoder"] = {k: v.detach().cpu() for k, v in prepared.encoder.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        torch.save(weights, tmp / "model.pt")
        (tmp / "model.json").write_text(json.dumps(meta, indent=2))
        os.chmod(tmp, 0o777 & ~current_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class LoadedModel:
    """A saved segmentor, ready to predict: encoder + head on a device, and its metadata."""

    meta: dict[str, Any]
    run: Any
    encoder: torch.nn.Module
    head: torch.nn.Module
    device: torch.device
    source: str

    @property
    def tile_size(self) -> int:
        return int(self.meta["tile_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def in_channels(self) -> int | None:
        return self.meta.get("in_channels")

    @torch.no_grad()
    def logits(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """(B, C, T, T) images in [-1, 1] -> (B, classes, T, T) float32 logits. ``keys`` name the
        windows: an encoder with fixed per-tile noise draws it from them, so that a window's
        prediction does not depend on which batch it was in."""
        from rsseg.device import autocast

        x = images.to(self.device, non_blocking=True)
        with autocast(self.device, self.run.runtime.precision):
            logits = self.head(self.encoder(x, keys, [0] * len(x) if keys is not None else None), x.shape[-2:])
        return logits.float()


def resolve_model_dir(ref: str, workdir: Workdir, tracking_uri: str | None = None) -> Path:
    """``runs:/<run id>`` (the work directory's copy, else MLflow's artifact), ``best:<experiment>``
    (its finished run with the highest validation mIoU: chosen on validation, never on test) or a
    saved model directory."""
    from rsseg import tracking

    if ref.startswith("best:"):
        ref = f"runs:/{best_run(ref[len('best:'):], workdir, tracking_uri)}"
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].strip("/").split("/")[0]
        local = workdir.models / run_id
        from rsseg import storage

        storage.pull(local)  # object storage: trained on another node
        if (local / "model.json").is_file():
            return local
        uri = tracking.resolve_uri(tracking_uri, workdir)
        c = tracking.client(uri)
        try:
            c.get_run(run_id)
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for an unknown id
            raise CheckpointError(f"{ref}: no run {run_id!r} in {uri}") from None
        dst = Path(tempfile.mkdtemp(prefix=f"rsseg-model-{run_id}-"))
        try:
            path = tracking.download_artifacts(uri, run_id, "model", dst)
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"{ref}: run {run_id} has no saved model (no 'model' artifact; was it a fine-tuning run?)") from None
        return path
    path = Path(ref).expanduser()
    if not (path / "model.json").is_file():
        raise CheckpointError(f"{path}: not a saved model (expected model.json and model.pt; or give runs:/<run id>)")
    return path


VAL_METRIC = "val/mIoU"


def best_run(experiment: str, workdir: Workdir, tracking_uri: str | None = None) -> str:
    from rsseg import tracking

    uri = tracking.resolve_uri(tracking_uri, workdir)
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise CheckpointError(f"best:{experiment}: no MLflow experiment {experiment!r} in {uri}")
    # the validation split chooses (its last evaluation, what a sweep's search metric is); the test
    # split only reports: choosing on it would leak the test set into the choice
    runs = c.search_runs([exp.experiment_id], filter_string="tags.kind = 'finetune' and attributes.status = 'FINISHED'",
                         order_by=[f"metrics.`{VAL_METRIC}` DESC", "attributes.start_time DESC"], max_results=1)
    if not runs or VAL_METRIC not in runs[0].data.metrics:
        raise CheckpointError(f"best:{experiment}: no finished fine-tuning run with a validation mIoU ({VAL_METRIC}) in {experiment!r}")
    return runs[0].info.run_id


def load_model(ref: str, workdir: Workdir | None = None, *, device: str | None = None, tracking_uri: str | None = None) -> LoadedModel:
    from rsseg.device import resolve
    from rsseg.heads import NeckHead, build_head
    from rsseg.checkpoints import store
    from rsseg.runspec import parse_run

    workdir = workdir or Workdir.resolve()
    path = resolve_model_dir(ref, workdir, tracking_uri)
    meta = json.loads((path / "model.json").read_text())
    run = parse_run(meta["run"])
    if device:
        run = run.model_copy(update={"runtime": run.runtime.model_copy(update={"device": device})})
    weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    method, enc_ref = run.plugin, meta["encoder"]
    if enc_ref.get("finetuned"):
        encoder = method.build_encoder(run, None) if enc_ref["kind"] == "none" else _skeleton(run, meta)
        encoder.load_state_dict(weights["encoder"])
    else:
        pretrained = None
        if enc_ref["kind"] == "pretrained":
            pretrained = store.find(run, workdir)
            if pretrained is None or pretrained.fingerprint != enc_ref["fingerprint"]:
                raise CheckpointError(f"{ref}: the model's encoder weights are missing from the store {workdir.checkpoints} "
                                      f"(pre-training fingerprint {enc_ref['fingerprint']}); point --workdir at the work "
                                      "directory that trained it, or train it again (`platform pretrain`)")
        elif enc_ref["kind"] == "imported" and store.find_imported(workdir, enc_ref["name"]) is None:
            raise CheckpointError(f"{ref}: the model's encoder weights are missing from the store: imported weights "
                                  f"{enc_ref['name']!r} ({enc_ref.get('fingerprint')}); `platform weights import` them first")
        encoder = method.build_encoder(run, pretrained)
    encoder.freeze() if hasattr(encoder, "freeze") else encoder.eval()
    neck = method.build_neck(run, encoder.feature_info)
    head = build_head(meta["head"], (neck or encoder).feature_info, meta["num_classes"], run.finetune)
    if neck is not None:
        head = NeckHead(neck, head)
    from rsseg.tensorfile import load_checked

    load_checked(head, weights["head"], f"{path}/model.pt: the head does not fit its model.json", error=CheckpointError)
    dev = resolve(run.runtime.device)
    return LoadedModel(meta, run, encoder.to(dev).eval(), head.to(dev).eval(), dev, str(path))


def _skeleton(run, meta):
    if run.plugin.skeleton is None:
        raise ConfigError(f"method {run.method!r} cannot rebuild a fine-tuned encoder (no skeleton builder)")
    return run.plugin.build_skeleton(run, int(meta.get("in_channels") or 3))


def list_models(workdir: Workdir) -> list[dict[str, Any]]:
    """The saved models of a work directory: run id, method, dataset, test mIoU, when."""
    root = workdir.models
    from rsseg import storage

    storage.pull(root, pattern="*/model.json")
    out = []
    for meta_path in sorted(root.glob("*/model.json")) if root.exists() else []:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.append({"run_id": meta_path.parent.name, "method": meta["method"], "dataset": meta["dataset"],
                    "head": meta["head"], "mIoU": meta["test"]["mIoU"], "encoder": meta["encoder"]["kind"],
                    "finetuned": meta["encoder"].get("finetuned", False), "path": str(meta_path.parent),
                    "mtime": meta_path.stat().st_mtime})
    return sorted(out, key=lambda m: m["mtime"])
