"""``platform evaluate``: a saved model over whole labelled scenes, with the windows prediction uses.

Every labelled scene of the dataset is predicted with `predict.slide` (the same windows and
blending as ``platform predict``) and compared with its labels pixel by pixel (nodata and the
ignore index excluded); intersections and unions are accumulated over all scenes. The result is
an MLflow run (kind ``evaluate``) with mIoU and per-class IoU, tagged with the model it scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rsseg.errors import DataError
from rsseg.metrics import ConfusionMatrix, SegMetrics

EVALUATE_EXPERIMENT = "rsseg-evaluate"


@dataclass
class EvaluateResult:
    metrics: SegMetrics
    scenes: int
    windows: int
    abbrs: list[str]
    run_id: str | None = None


def evaluate_scenes(model, data, workdir, *, overlap: int | None = None, batch_size: int = 8, tracking_uri: str | None = None,
                    progress: bool = False) -> EvaluateResult:
    from rasterio.windows import Window

    from rsseg import tracking
    from rsseg.data import registry
    from rsseg.data.scenes import open_raster
    from rsseg.data.tiles import decode_label
    from rsseg.predict import SceneReader, slide
    from rsseg.progress import line
    from rsseg.resolved import resolve

    scenes = registry.scenes(data, workdir)
    table = scenes.table
    if table.names != model.meta["classes"]["names"]:
        raise DataError(f"data.class_table: {table.name!r} ({table.num_classes} classes) is not the model's class table "
                        f"{model.meta['classes']['name']!r} ({model.num_classes} classes); evaluate on data labelled like its training data")
    if not scenes.labelled:
        raise DataError(f"{data.dataset}: no labelled scenes to evaluate on")
    cm = ConfusionMatrix(table.num_classes)
    windows = 0
    for k, scene in enumerate(scenes.labelled, 1):
        reader = SceneReader(scene.image, model.meta.get("bands"), model.meta.get("value_range"), model.meta.get("in_channels"))
        label_src = open_raster(scene.label)
        try:
            def on_strip(row, col, logits, valid, label_src=label_src, scene=scene):
                h, w = valid.shape
                labels = decode_label(label_src.read(window=Window(col, row, w, h)), table, scene.label).astype(np.int64)
                labels[~valid] = cm.ignore_index
                cm.update(torch.from_numpy(logits.argmax(axis=0)), torch.from_numpy(labels))

            report = (lambda d, t, k=k: line(f"scene {k}/{len(scenes.labelled)}: {d}/{t} windows", "evaluate", final=d == t)) if progress else None
            windows += slide(model, reader, on_strip, overlap=overlap, batch_size=batch_size, progress=report)
        finally:
            reader.close()
            label_src.close()
    metrics = cm.compute()
    result = EvaluateResult(metrics, len(scenes.labelled), windows, table.abbrs)
    uri = tracking.resolve_uri(tracking_uri, workdir)
    tracking.init_store(uri)
    tags = resolve(model.run).tags("evaluate").to_tags() | {
        "model": model.source, "evaluated_dataset": data.dataset, "evaluated_root": str(data.root or "")}
    run = tracking.start_run(uri, EVALUATE_EXPERIMENT, f"evaluate-{model.run.method}-{data.dataset}", tags=tags, workdir=workdir)
    with tracking.tracked(run):
        run.log_params(tracking.flatten({"data": data.model_dump(mode="json"), "overlap": overlap, "model": model.source}))
        run.log_metrics({**metrics.as_dict(table.abbrs), "scenes": len(scenes.labelled), "windows": windows})
    result.run_id = run.run_id
    return result
