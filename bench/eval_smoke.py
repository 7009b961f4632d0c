"""Evidence (issue: the paper's method end to end): at 2 % labels on the synthetic data,
test mIoU of

  (a) frozen features of the pre-trained DDPM + the MLP segmentor (the paper's method),
  (b) frozen features of the same UNet with random weights + the MLP segmentor,
  (c) the per-pixel colour baseline (and, for reference, the texture baseline),

three fine-tuning seeds each, mean ± std; then the feature cache: the same run with features
computed online, with a cold cache and with a warm one. Settings: sweeps/finetune.yaml under
the smoke profile (the demo's data and pre-training; trained first if missing, on Ray).

    python bench/eval_smoke.py            # or: make eval-smoke
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import append  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from rsseg import finetune, raycluster
    from rsseg.runspec import load_run
    from rsseg.data.dataset import TileDataset
    from rsseg.data.pixel_baselines import colour_baseline, texture_baseline
    from rsseg.checkpoints import store
    from rsseg.pretrain.ensure import ensure_pretrained
    from rsseg.workdir import Workdir

    wd = Workdir.resolve().ensure()
    spec = REPO / "sweeps" / "finetune.yaml"
    base = load_run(spec, "smoke").spec
    if store.find(base, wd) is None:
        raycluster.init()
        print("pre-training (smoke) first ...", flush=True)
        ensure_pretrained(base, wd, progress=True)
    pretrained = store.find(base, wd)
    seeds = (0, 1, 2)
    rows: dict[str, list[float]] = {"(a) DDPM pre-trained, frozen + MLP": [], "(b) same UNet, random weights, frozen + MLP": []}
    for seed in seeds:
        for label, extra in (("(a) DDPM pre-trained, frozen + MLP", []), ("(b) same UNet, random weights, frozen + MLP", ["ddpm.features.weights=random"])):
            run = load_run(spec, "smoke", [f"seed={seed}", *extra]).spec
            r = finetune.run(run, wd, pretrained=pretrained if not extra else None)
            rows[label].append(r.test.miou)
            print(label, seed, f"{100 * r.test.miou:.1f}", flush=True)
    p = finetune.prepare(base, wd, pretrained)
    train = TileDataset(p.reader, p.index.subset(base.data.label_ratio))
    colour = colour_baseline(train, p.test, p.table.num_classes).metrics.miou
    texture = texture_baseline(train, p.test, p.table.num_classes).metrics.miou
    rows["(c) per-pixel colour baseline (deterministic)"] = [colour] * len(seeds)
    rows["reference: texture baseline (local statistics + MLP)"] = [texture] * len(seeds)

    lines = [f"Synthetic data of the smoke profile ({base.data.synthetic.scenes} scenes of {base.data.synthetic.size}², "
             f"{base.data.tile_size}² tiles), label ratio {base.data.label_ratio:g} = {len(train)} training tiles; tiny UNet "
             f"pre-trained {base.pretrain.iterations.n_total} iterations (fingerprint {pretrained.fingerprint}); "
             f"timesteps {base.ddpm.features.timesteps}, decoder 1/16-1/2, {base.finetune.iterations} fine-tuning iterations; "
             f"fine-tuning seeds {list(seeds)}.", "", "| features | test mIoU (%) mean ± std | per seed |", "|---|---:|---|"]
    for label, vals in rows.items():
        v = 100 * np.array(vals)
        lines.append(f"| {label} | {v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    a, b = np.mean(rows["(a) DDPM pre-trained, frozen + MLP"]), np.mean(rows["(b) same UNet, random weights, frozen + MLP"])
    verdict = "(a) > (b) > (c) holds" if a > b > colour else f"the expected order (a) > (b) > (c) does NOT hold: a={100 * a:.1f}, b={100 * b:.1f}, c={100 * colour:.1f}"
    lines += ["", f"Result: {verdict}."]

    # Cache: the same run (no radiometric stretch, so training batches can use the cache too).
    run = load_run(spec, "smoke", ["finetune.augment.stretch=false"]).spec
    timings = {}
    online = finetune.run(load_run(spec, "smoke", ["finetune.augment.stretch=false", "finetune.cache.enabled=false"]).spec, wd, pretrained=pretrained)
    timings["online (no cache)"] = online.seconds
    cached = finetune.prepare(run, wd, pretrained).cached
    shutil.rmtree(wd.cache / "features" / cached.cache_id, ignore_errors=True)
    cold = finetune.run(run, wd, pretrained=pretrained)
    timings["cold cache (computes and writes)"] = cold.seconds
    warm = finetune.run(run, wd, pretrained=pretrained)
    timings["warm cache (reads only)"] = warm.seconds
    lines += ["", "Feature cache, same run (stretch off so training batches are cacheable too):", "",
              "| features | total s | training s | evaluation s |", "|---|---:|---:|---:|"]
    for k, s in timings.items():
        lines.append(f"| {k} | {s['total_s']:.1f} | {s['train_s']:.1f} | {s['eval_s']:.1f} |")
    lines.append(f"\nThe three runs' test mIoU: {100 * online.test.miou:.2f} / {100 * cold.test.miou:.2f} / {100 * warm.test.miou:.2f} % "
                 "(cached features are stored as float16, so the online run may differ in the last digits).")
    append("Evidence: frozen DDPM features vs random weights vs colour, 2 % labels (synthetic)", "\n".join(lines))


if __name__ == "__main__":
    main()
