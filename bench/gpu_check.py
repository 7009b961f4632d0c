"""The first thing to run on a GPU machine: the platform's own GPU paths at the paper's scale,
timed, each figure printed as soon as it is measured.

    python bench/gpu_check.py                      # on a CUDA machine: <= 5 minutes on one H100
    python bench/gpu_check.py --rates rates.json   # also write the per-stage rates that
                                                   # `platform sweep X --dry-run --rates rates.json` reads
    python bench/gpu_check.py --smoke              # tiny sizes (on the CPU where there is no GPU): the same
                                                   # code, in seconds; on a GPU, a first look before the real run

What runs is the platform's code, not a copy of it:

- ``pretrain``    the Trainer (`rsseg.pretrain.trainer`, no Ray: `LocalGroup`) on the paper's SR3
                  UNet (sweeps/pretrain.yaml, --profile paper: 97.8 M parameters, noise-level
                  conditioning, bf16 autocast, EMA on), 256 px tiles: images/s, TFLOP/s, % of the
                  measured bf16 matmul peak, peak memory, one checkpoint's seconds;
- ``pretrain_2rank`` the same over two GPUs with an NCCL process group (DDP), when there are two;
- ``extraction``  the frozen SR3 encoder (`DdpmEncoder`, sweeps/finetune.yaml: the last decoder
                  map of 1/16 .. 1/2 at t = 50, 100, 150 in one batched forward, stopping after the
                  last map it needs) against the full network;
- ``finetune``    `Finetuner.train_step` of the 16.3 M MLP segmentor on features from a warm
                  feature cache (`CachedEncoder`), and with the features computed online (the
                  paper's way, no cache);
- ``evaluation``  `finetune.evaluate` over cached features;
- ``predict``     `predict.slide` over a 2 048 x 2 048 scene (an in-memory reader; no rasterio).

An item that fails prints its error and the others still run. Needs torch, diffusers,
transformers, numpy, pydantic, pyyaml and rsseg itself — no Ray, MLflow, rasterio or polars;
``bench/device_wheels.sh`` fetches the wheels a bare Python 3.12 + CUDA torch machine lacks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
for sub in ("platform", "baselines"):  # a source checkout works without installing rsseg
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

RESULTS: dict[str, dict] = {}


def emit(item: str, **figures) -> dict:
    """One JSON line per item, printed at once (a later failure loses nothing)."""
    RESULTS[item] = figures
    print(json.dumps({"item": item, **figures}, default=float), flush=True)
    return figures


def guarded(item: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - report and go on with the next item
        emit(item, ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
             where=traceback.format_exc().strip().splitlines()[-3][:200], seconds=time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def percent(tflops: float) -> float | None:
    peak = RESULTS.get("peak", {}).get("tflops")
    return 100.0 * tflops / peak if peak else None


class Sizes:
    """What is measured: the paper's scale on a GPU, tiny sizes on the CPU (--smoke)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        shrink = ["ddpm.unet.overrides={block_out_channels: [32, 32, 64, 64, 64]}", "data.tile_size=64"] if smoke else []
        self.overrides = shrink
        self.pretrain_batch, self.pretrain_steps, self.warmup = (2, 4, 1) if smoke else (8, 40, 8)
        self.big_batch = 4 if smoke else 32  # a second pre-training batch size, where memory allows
        self.tiles, self.extract_batch = (8, 2) if smoke else (96, 16)
        self.ft_steps = 4 if smoke else 30
        self.scene = 256 if smoke else 2048
        self.matmul = 256 if smoke else 8192


def runs(sizes: Sizes):
    """(the pre-training run, the fine-tuning run) of the paper's files, paper profile."""
    from rsseg.runspec import load_run

    data = os.environ.get("RSSEG_DATA") or tempfile.gettempdir()
    os.environ.setdefault("RSSEG_DATA", data)
    os.environ.setdefault("RSSEG_ARCHIVE", data)
    pre = load_run(REPO / "sweeps" / "pretrain.yaml", "paper", sizes.overrides).spec
    ft = load_run(REPO / "sweeps" / "finetune.yaml", "paper", sizes.overrides).spec
    return pre, ft


class RandomTiles(torch.utils.data.Dataset):
    """In-memory tiles in [-1, 1] with labels: what the tile datasets give, without rasters."""

    def __init__(self, n: int, bands: int, size: int, classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, bands, size, size, generator=g) * 2 - 1
        self.masks = torch.randint(0, classes, (n, size, size), generator=g)
        self.tile_ids = [f"bench:{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        i = int(key[0]) if isinstance(key, (tuple, list)) else int(key)  # (tile, augmentation draw) or a tile
        return {"image": self.images[i], "mask": self.masks[i], "index": i, "variant": 0, "stretched": False}


# ---------------------------------------------------------------------------------------------- items


def item_device(device: torch.device) -> None:
    import diffusers
    import transformers

    figures = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
               "python": sys.version.split()[0]}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        figures |= {"name": p.name, "memory_gib": p.total_memory / 2**30, "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count, "gpus": torch.cuda.device_count()}
    else:
        figures |= {"name": "cpu", "threads": torch.get_num_threads()}
    emit("device", **figures)


def item_peak(device: torch.device, sizes: Sizes) -> None:
    """bf16 matmul TFLOP/s (fp32 on the CPU), best of two sizes."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best = 0.0
    for n in (sizes.matmul // 2, sizes.matmul):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(device)
        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    emit("peak", tflops=best, dtype=str(dtype).removeprefix("torch."))


def _plan(run, root: Path, steps: int):
    from rsseg.checkpoints import store
    from rsseg.pretrain.trainer import TrainPlan

    sdir = store.StoreDir(root / "store")
    return TrainPlan(fingerprint=run.pretrain_fingerprint, store_root=str(sdir.root), workdir=str(root), run=run,
                     in_channels=3, counts=(0, 10 * steps), tracking_uri="", mlflow_run_id="", stop_after=steps)


def _pretrain_once(run, device: torch.device, sizes: Sizes, batch: int, rank: int = 0, world: int = 1) -> dict:
    """The Trainer's fit for ``pretrain_steps`` steps; the steps after the warm-up are timed."""
    from rsseg.device import compute_precision
    from rsseg.flops import pretrain_flops
    from rsseg.pretrain.trainer import LocalGroup, Trainer

    run = run.model_copy(update={"pretrain": run.pretrain.model_copy(update={
        "batch_size": batch, "runtime": run.pretrain.runtime.model_copy(update={"workers": world, "checkpoint_every": 10**9,
                                                                                 "log_every": 10})})})
    steps = sizes.pretrain_steps
    data = RandomTiles(64 if not sizes.smoke else 8, 3, run.data.tile_size, 2)
    with tempfile.TemporaryDirectory() as d:
        reset_memory(device)
        trainer = Trainer(_plan(run, Path(d), steps), rank, world, device, group=LocalGroup(),
                          data={"archive": None, "homogeneous": data})
        marks: dict[str, float] = {}
        original = trainer.step

        def step(s, images):
            out = original(s, images)
            if s + 1 in (sizes.warmup, steps):
                sync(device)
                marks[f"after_{s + 1}"] = time.perf_counter()
            return out

        save = trainer.checkpoints.save

        def timed_save(done, state):
            t0 = time.perf_counter()
            path = save(done, state)
            marks["checkpoint_s"] = time.perf_counter() - t0
            return path

        trainer.step = step
        trainer.checkpoints.save = timed_save
        trainer.fit()
    seconds = marks[f"after_{steps}"] - marks[f"after_{sizes.warmup}"]
    images = (steps - sizes.warmup) * batch
    per_image = pretrain_flops(run, 3)
    tflops = images * per_image / seconds / 1e12 if per_image else None
    return {"batch": batch, "images_per_s": images / seconds, "tflops": tflops, "percent_of_peak": percent(tflops) if tflops else None,
            "gflop_per_image": per_image / 1e9 if per_image else None, "peak_memory_gib": peak_gib(device),
            "checkpoint_s": marks.get("checkpoint_s"), "ema": trainer.ema is not None,
            "precision": compute_precision(device, run.runtime.precision), "network": f"{run.ddpm.unet.preset} "
            f"{sum(p.numel() for p in trainer.net.parameters()) / 1e6:.1f} M, {run.data.tile_size} px"}


def item_pretrain(pre, device: torch.device, sizes: Sizes) -> None:
    emit("pretrain", **_pretrain_once(pre, device, sizes, sizes.pretrain_batch))
    guarded("pretrain_batch", lambda: emit("pretrain_batch", **_pretrain_once(pre, device, sizes, sizes.big_batch)))


def _ddp_worker(rank: int, pre_json: dict, smoke: bool, port: int, out: str) -> None:
    import torch.distributed as dist

    from rsseg.runspec import parse_run

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        figures = _pretrain_once(parse_run(pre_json), torch.device("cuda", rank), Sizes(smoke), 2 * Sizes(smoke).pretrain_batch,
                                 rank=rank, world=2)
        if rank == 0:
            Path(out).write_text(json.dumps(figures, default=float))
    finally:
        dist.destroy_process_group()


def item_pretrain_2rank(pre, device: torch.device, sizes: Sizes) -> None:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        emit("pretrain_2rank", skipped=f"{torch.cuda.device_count() if device.type == 'cuda' else 0} GPU(s): needs 2")
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    mp.spawn(_ddp_worker, args=(pre.model_dump(mode="json"), sizes.smoke, port, out), nprocs=2, join=True)
    emit("pretrain_2rank", **json.loads(Path(out).read_text()), backend="nccl")


def _encoder(ft, device: torch.device):
    """The run's DDPM encoder with untrained weights (speed does not depend on them), frozen."""
    from rsseg.methods.ddpm.encoder import skeleton

    return skeleton(ft, 3).freeze().to(device).eval()


def item_extraction(ft, device: torch.device, sizes: Sizes) -> None:
    from rsseg.device import autocast
    from rsseg.flops import unit_flops

    reset_memory(device)
    enc = _encoder(ft, device)
    b, t = sizes.extract_batch, len(enc.timesteps)
    x = torch.rand(b, 3, ft.data.tile_size, ft.data.tile_size, device=device) * 2 - 1
    keys, variants = [f"k{i}" for i in range(b)], [0] * b
    xt, cond = enc.noised(x, keys, variants)
    xt = xt.to(enc.unet.dtype)
    out = {}
    for name, full in (("early_exit", False), ("full", True)):
        def run():
            with torch.no_grad(), autocast(device, ft.runtime.precision):
                enc.extract(xt, cond, full=full)

        for _ in range(2):
            run()
        sync(device)
        reps = 3 if sizes.smoke else 10
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        sync(device)
        out[name] = reps * b / (time.perf_counter() - t0)
    per_pass = unit_flops(ft, 3, 12, ft.head_name).extraction
    tflops = out["early_exit"] * t * per_pass / 1e12
    emit("extraction", tiles_per_s=out["early_exit"], passes_per_s=out["early_exit"] * t, full_network_tiles_per_s=out["full"],
         early_exit_speedup=out["early_exit"] / out["full"], timesteps=enc.timesteps, maps=[fi.name for fi in enc.feature_info],
         tflops=tflops, percent_of_peak=percent(tflops), gflop_per_pass=per_pass / 1e9, peak_memory_gib=peak_gib(device))


def _prepared(ft, device: torch.device, sizes: Sizes, root: Path, cached: bool):
    """`finetune.Prepared` over in-memory tiles: the run's encoder, head and (optionally) the cache."""
    from rsseg.cache import CachedEncoder, FeatureCache, cache_key
    from rsseg.device import compute_precision
    from rsseg.finetune import Prepared
    from rsseg.heads import build_head

    classes = 12
    enc = _encoder(ft, device)
    torch.manual_seed(0)
    head = build_head("mlp", enc.feature_info, classes, ft.finetune).to(device)
    ds = RandomTiles(sizes.tiles, 3, ft.data.tile_size, classes)
    table = SimpleNamespace(num_classes=classes, abbrs=[f"c{i}" for i in range(classes)], names=[f"c{i}" for i in range(classes)])
    store = None
    if cached:
        key = cache_key(enc, compute_precision(device, ft.runtime.precision))
        store = CachedEncoder(enc, FeatureCache.open(root / "features", 1000.0, key), key)
    return Prepared(None, None, ds, ds, ds, enc, head, "mlp", True, store, table, device=device, precision=ft.runtime.precision,
                    loader_workers=0)


def _train_steps(ft, p, sizes: Sizes, device: torch.device) -> float:
    """Seconds per Finetuner.train_step (after one warm-up step)."""
    from rsseg.finetune import Finetuner

    loop = Finetuner(ft, p)
    batches = loop.batches()
    loop.train_step(0, next(batches))
    sync(device)
    t0 = time.perf_counter()
    for it in range(1, sizes.ft_steps + 1):
        loop.train_step(it, next(batches))
    loop.read_scalars()
    sync(device)
    return (time.perf_counter() - t0) / sizes.ft_steps


def item_finetune(ft, device: torch.device, sizes: Sizes) -> None:
    from rsseg.encoders import count_parameters
    from rsseg.finetune import evaluate
    from rsseg.flops import unit_flops

    ft = ft.model_copy(update={"finetune": ft.finetune.model_copy(update={"iterations": sizes.ft_steps + 1})})
    units = unit_flops(ft, 3, 12, ft.head_name)
    batch = ft.finetune.batch_size
    with tempfile.TemporaryDirectory() as d:
        reset_memory(device)
        p = _prepared(ft, device, sizes, Path(d), cached=True)
        evaluate(p, p.train, ft.finetune.eval_batch_size)  # warms the cache: every tile computed and stored once
        t0 = time.perf_counter()
        evaluate(p, p.train, ft.finetune.eval_batch_size)
        sync(device)
        eval_tiles_per_s = len(p.train) / (time.perf_counter() - t0)
        step_s = _train_steps(ft, p, sizes, device)
        tflops = batch * units.finetune / step_s / 1e12
        emit("finetune", iterations_per_s=1 / step_s, samples_per_s=batch / step_s, batch=batch, features="warm cache",
             head_params_M=count_parameters(p.head) / 1e6, tflops=tflops, percent_of_peak=percent(tflops),
             gflop_per_sample=units.finetune / 1e9, peak_memory_gib=peak_gib(device))
        ev_tflops = eval_tiles_per_s * units.evaluation / 1e12
        emit("evaluation", tiles_per_s=eval_tiles_per_s, features="warm cache", tflops=ev_tflops, percent_of_peak=percent(ev_tflops))
    online = _prepared(ft, device, sizes, Path("."), cached=False)
    step_s = _train_steps(ft, online, sizes, device)
    emit("finetune_online", iterations_per_s=1 / step_s, samples_per_s=batch / step_s, batch=batch,
         features=f"computed every step ({len(online.encoder.timesteps)} timesteps, the paper's online generation)")


class ArrayScene:
    """A scene in memory with the reader interface `predict.slide` uses."""

    def __init__(self, size: int, bands: int = 3):
        self.image = (torch.rand(bands, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1).numpy()
        self.path = Path(f"bench-{size}.tif")

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[2]

    def read(self, row: int, col: int, tile: int):
        import numpy as np

        out = np.zeros((self.image.shape[0], tile, tile), dtype=np.float32)
        part = self.image[:, row:row + tile, col:col + tile]
        out[:, : part.shape[1], : part.shape[2]] = part
        valid = np.zeros((tile, tile), dtype=bool)
        valid[: part.shape[1], : part.shape[2]] = True
        return out, valid


def item_predict(ft, device: torch.device, sizes: Sizes) -> None:
    from rsseg.heads import build_head
    from rsseg.models import LoadedModel
    from rsseg.predict import slide

    enc = _encoder(ft, device)
    head = build_head("mlp", enc.feature_info, 12, ft.finetune).to(device).eval()
    model = LoadedModel({"tile_size": ft.data.tile_size, "num_classes": 12}, ft, enc, head, device, "bench")
    scene = ArrayScene(sizes.scene)
    strips = []
    sync(device)
    t0 = time.perf_counter()
    windows = slide(model, scene, lambda row, col, logits, valid: strips.append(logits.shape), batch_size=8)
    seconds = time.perf_counter() - t0
    emit("predict", scene_px=f"{sizes.scene}x{sizes.scene}", windows=windows, seconds=seconds,
         megapixels_per_s=sizes.scene**2 / seconds / 1e6, windows_per_s=windows / seconds, tile=ft.data.tile_size)


# ---------------------------------------------------------------------------------------------- rates, main


def rates_document() -> dict:
    """What `platform sweep --dry-run --rates FILE` reads: the FLOP/s each stage reached here."""
    from rsseg.sweep.cost import RATES_KIND

    stage_items = {"pretrain": "pretrain", "extraction": "extraction", "finetune": "finetune", "evaluation": "evaluation"}
    stages = {}
    for stage, item in stage_items.items():
        r = RESULTS.get(item, {})
        if r.get("tflops"):
            stages[stage] = {"tflops": r["tflops"], **{k: v for k, v in r.items() if k in
                             ("images_per_s", "passes_per_s", "samples_per_s", "tiles_per_s", "batch", "network")}}
    return {"kind": RATES_KIND, "version": 1, "device": RESULTS.get("device", {}).get("name", "?"),
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "peak_tflops": RESULTS.get("peak", {}).get("tflops"), "stages": stages}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script through the same code)")
    ap.add_argument("--rates", type=Path, help="write the per-stage rates for `platform sweep --dry-run --rates`")
    ap.add_argument("--only", nargs="*", help="run only these items")
    args = ap.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: on a CPU, run with --smoke (tiny sizes, the same code)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    sizes = Sizes(args.smoke)
    t0 = time.perf_counter()
    guarded("device", item_device, device)
    guarded("peak", item_peak, device, sizes)
    try:
        pre, ft = runs(sizes)
    except Exception as exc:  # noqa: BLE001
        emit("runs", ok=False, error=f"{type(exc).__name__}: {exc}")
        return 1
    items = {"pretrain": (item_pretrain, pre), "pretrain_2rank": (item_pretrain_2rank, pre), "extraction": (item_extraction, ft),
             "finetune": (item_finetune, ft), "predict": (item_predict, ft)}
    for name, (fn, run) in items.items():
        if args.only and name not in args.only:
            continue
        guarded(name, fn, run, device, sizes)
    failed = [k for k, v in RESULTS.items() if v.get("ok") is False]
    emit("done", seconds=time.perf_counter() - t0, failed=failed)
    if args.rates:
        args.rates.write_text(json.dumps(rates_document(), indent=1, default=float))
        print(f"wrote {args.rates}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
