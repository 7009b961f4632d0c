"""Whole-scene prediction at scale (issue: models in and out): tiles/s and the peak RSS of a
`platform predict` process on 2 500² and 10 000² synthetic 3-band scenes. Windowed reads and
banded windowed writes: peak memory must not grow with the scene (flat RSS is the target).

The model: random-weight tiny-UNet DDPM features at t = 0 with a trained MLP head, 256 px tiles
(a quarter-tile overlap), fine-tuned for a few iterations on the synthetic data (its quality is not
the point: its cost per window is the same as a trained one's). Each prediction runs in its own
process; its peak RSS is the kernel's ru_maxrss of that process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import append  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_scene(path: Path, size: int) -> None:
    """A size² uint8 GeoTIFF written in 1 024-row bands (never held whole)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", crs="EPSG:32631", transform=from_origin(500000, 5000000, 0.5, 0.5))
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, 1024):
            h = min(1024, size - r)
            dst.write(rng.integers(0, 255, (3, h, size), dtype=np.uint8), window=Window(0, r, size, h))


def train_model(wd: Path) -> str:
    sys.path.insert(0, str(REPO / "platform"))
    from rsseg import runner
    from rsseg.runspec import RunSpec
    from rsseg.workdir import Workdir

    run = RunSpec(data={"tile_size": 256, "synthetic": {"scenes": 3, "size": 512}},
                  ddpm={"unet": {"preset": "tiny"}, "features": {"weights": "random", "timesteps": [0]}},
                  finetune={"iterations": 4, "eval_every": 4, "batch_size": 4, "log_predictions": 0, "val_max_tiles": 4})
    _, tracker = runner.execute(run, Workdir.resolve(wd).ensure(), profile="bench")
    return f"runs:/{tracker.run_id}"


def predict(wd: Path, model: str, scene: Path, out: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, windows) of one `platform predict` process."""
    cmd = [str(REPO / ".venv" / "bin" / "platform"), "--workdir", str(wd), "predict", model, str(scene), "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    text = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(text[-2000:])
    windows = int(text.rsplit("(", 1)[1].split(" windows")[0])
    return seconds, usage.ru_maxrss / 1024.0, windows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rsbench-predict-") as d:
        d = Path(d)
        model = train_model(d / "w")
        rows = []
        for size in args.sizes:
            scene = d / f"scene_{size}.tif"
            write_scene(scene, size)
            seconds, rss, windows = predict(d / "w", model, scene, d / "out")
            rows.append((size, windows, seconds, windows / seconds, rss))
            scene.unlink()
    lines = ["`platform predict` of one 3-band uint8 scene, tiny-UNet DDPM features (t = 0) + MLP head, 256 px windows with a "
             "64 px overlap, batch 8, CPU; the whole process (start-up and COG conversion included).", "",
             "| scene | windows | seconds | windows/s | peak RSS (MiB) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {s:,}² | {w:,} | {t:.0f} | {r:.2f} | {m:.0f} |" for s, w, t, r, m in rows]
    if len(rows) > 1:
        lines += ["", f"Peak RSS {rows[-1][4] / rows[0][4]:.2f}x from {rows[0][0]:,}² to {rows[-1][0]:,}² "
                      f"({(rows[-1][0] / rows[0][0]) ** 2:.0f}x the pixels): flat is the target."]
    append("Whole-scene prediction: windows/s and peak RSS vs scene size", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
