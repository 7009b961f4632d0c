"""The GPU code paths, run on the CPU through the simulated CUDA device (tests/simcuda.py):
the real Trainer, fine-tuning, model loading and prediction, the baselines' objectives, with
``runtime.device: cuda`` and bf16, against a device that refuses what CUDA refuses and counts the
host synchronisations. No Ray, no GPU."""

import numpy as np
import pytest
import torch

from conftest import RGB_BYTE, tiny_run
from simcuda import SimTensor, host, on_device, simulated_cuda
from rsseg import finetune
from rsseg.checkpoints import store
from rsseg.pretrain.trainer import LocalGroup, TrainPlan, Trainer, mean_over_ranks
from rsseg.workdir import Workdir

CUDA = {"runtime": {"device": "cuda"}}
SR3 = {"unet": {"preset": "sr3", "overrides": {"block_out_channels": [32, 32, 64, 64, 64]}}, "schedule": {"preset": "ddpm_cd"}}
STEPS = {"iterations": {"archive": 4, "homogeneous": 4}, "batch_size": 4,
         "runtime": {"workers": 1, "checkpoint_every": 4, "log_every": 4, "samples": 0}}


PRETRAINED = STEPS  # the fine-tuning tests' pre-training


def pretrain_run(unet: str = "tiny", **over):
    ddpm = SR3 if unet == "sr3" else {}
    return tiny_run(**{**CUDA, "ddpm": ddpm, "pretrain": STEPS, **over})


def plan_of(run, wd: Workdir, **extra) -> TrainPlan:
    sdir = store.StoreDir.for_run(run, wd)
    return TrainPlan(fingerprint=run.pretrain_fingerprint, store_root=str(sdir.root), workdir=str(wd.root),
                     run=run, in_channels=3, counts=run.pretrain.iterations.counts(), tracking_uri="",
                     mlflow_run_id="", **extra)


def fit(run, wd: Workdir, world: int = 1, **extra) -> Trainer:
    """A fresh worker process on the simulated GPU: its own CUDA generator, the Trainer's fit."""
    with simulated_cuda(world=world):
        trainer = Trainer(plan_of(run, wd, **extra), 0, world, torch.device("cuda", 0), group=LocalGroup())
        trainer.fit()
    return trainer


def final_state(run, wd: Workdir) -> dict:
    found = store.find(run, wd)
    assert found is not None, "no final checkpoint"
    return found.load()


@pytest.fixture(scope="module")
def data_wd(tmp_path_factory):
    """A work directory with tiny_run's synthetic data and tile indexes built once."""
    from rsseg.pretrain.data import pretrain_datasets

    wd = Workdir.resolve(tmp_path_factory.mktemp("sim-data")).ensure()
    pretrain_datasets(tiny_run(), wd)
    return wd


def fresh_wd(data_wd: Workdir, tmp_path) -> Workdir:
    """Another store over the same data (a resumed run must not find the uninterrupted one's checkpoints)."""
    import shutil

    wd = Workdir.resolve(tmp_path / "w").ensure()
    for sub in ("data", "indexes"):
        src = data_wd.root / sub
        if src.exists():
            shutil.copytree(src, wd.root / sub, dirs_exist_ok=True)
    return wd


# ---------------------------------------------------------------------------------------------- the layer itself


def test_the_simulated_device_refuses_what_cuda_refuses():
    with simulated_cuda() as sim:
        x = torch.randn(4, 3, device="cuda")
        assert isinstance(x, SimTensor) and x.device == torch.device("cuda", 0) and x.is_cuda
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            x + torch.randn(4, 3)
        assert (x * torch.tensor(2.0)).device.type == "cuda"  # a 0-dim host scalar is allowed
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
            torch.randn(4, device="cuda", generator=torch.Generator().manual_seed(0))
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            x.numpy()
        lin = torch.nn.Linear(3, 2)
        weight = lin.weight
        lin.to("cuda")
        assert lin.weight is weight and isinstance(lin.weight, SimTensor)  # parameters keep their identity
        with pytest.raises(RuntimeError, match="same device"):
            lin(torch.randn(4, 3))  # a batch left on the host
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = lin(x)
        assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
        before = sim.syncs.total
        float(y.detach().float().sum())
        y.cpu()
        assert sim.syncs.total == before + 2
        # dropout on the device draws from the device's generator, which torch.manual_seed seeds
        torch.manual_seed(1)
        a = torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)
        torch.manual_seed(1)
        torch.rand(10)  # the host generator moves; the device's does not
        b = torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)
        assert torch.equal(host(a), host(b))
        mean_over_ranks(torch.tensor(2.0, device="cuda"), 2)
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            mean_over_ranks(torch.tensor(2.0), 2)


def test_bf16_convolutions_and_products_accumulate_in_fp32_and_keep_their_dtypes():
    """The simulation's bf16 convolutions and matrix products run in fp32 with bf16 outputs (a GPU's
    fp32 accumulation; the host's bf16 kernels are too slow for the suite): the dtypes, gradients'
    dtypes and errors are the real ones."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    expected = torch.nn.functional.conv2d(x.bfloat16().float(), conv.weight.bfloat16().float(),
                                          conv.bias.bfloat16().float(), padding=1).bfloat16()
    with simulated_cuda():
        conv.to("cuda")
        xd = x.to("cuda").requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = conv(xd)
        assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
        assert torch.equal(host(y.detach()), expected)
        y.float().sum().backward()
        assert conv.weight.grad.dtype == torch.float32 and xd.grad.dtype == torch.float32  # autocast's casts, undone
        a, b = torch.randn(4, 5, device="cuda").bfloat16(), torch.randn(5, 3, device="cuda")
        assert (a @ b.bfloat16()).dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="same dtype|dtype"):
            a @ b  # a bf16 x fp32 product: refused, as by the real kernel


# ---------------------------------------------------------------------------------------------- pre-training


@pytest.mark.parametrize("unet", ["tiny", "sr3"])
def test_pretraining_on_cuda_with_ema_saves_and_resumes_exactly(unet, data_wd, tmp_path):
    """Both conditionings (tiny: the timestep; sr3: the noise level, dropout 0.2), bf16, EMA on:
    8 steps straight equal 4 steps, a new worker process, 4 more — weights and EMA weights."""
    # tiles read ahead by DataLoader processes on the tiny run (what the paper profile does)
    run = pretrain_run(unet, runtime={"device": "cuda", "loader_workers": 2 if unet == "tiny" else 0})
    straight = fit(run, data_wd)
    assert straight.ema is not None and on_device(straight.ema.shadow) and on_device(list(straight.net.parameters()))
    full = final_state(run, data_wd)
    assert not on_device(full["model"]) and not on_device(full["ema"]["shadow"])  # checkpoints load anywhere
    assert full["step"] == 8 and len(full["ema"]["shadow"]) == len(full["model"])

    wd = fresh_wd(data_wd, tmp_path)
    fit(run, wd, stop_after=4)
    (ckpt,) = store.checkpoints(store.StoreDir.for_run(run, wd))
    assert ckpt[0] == 4 and "cuda" in store.load(ckpt[1], run.pretrain_fingerprint)["rng"]
    fit(run, wd)  # the restarted worker resumes from step 4
    resumed = final_state(run, wd)
    for part in ("model",):
        assert all(torch.equal(full[part][k], resumed[part][k]) for k in full[part]), f"{part} differs after resume"
    assert all(torch.equal(full["ema"]["shadow"][k], resumed["ema"]["shadow"][k]) for k in full["ema"]["shadow"])
    assert full["ema"]["updates"] == resumed["ema"]["updates"] == 8


def test_without_the_gpu_generator_in_the_checkpoint_a_resumed_sr3_run_differs(data_wd, tmp_path, monkeypatch):
    """Negative control of the exact-resume test: sr3's dropout draws from the CUDA generator."""
    from rsseg.pretrain import trainer

    run = pretrain_run("sr3")
    fit(run, data_wd)
    full = final_state(run, data_wd)
    host_only = trainer.rng_states
    monkeypatch.setattr(trainer, "rng_states", lambda device=None: host_only(None))
    wd = fresh_wd(data_wd, tmp_path)
    fit(run, wd, stop_after=4)
    fit(run, wd)
    resumed = final_state(run, wd)
    assert not all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])


def test_negative_control_a_network_left_on_the_host_is_caught(data_wd, tmp_path, monkeypatch):
    """The layer catches a removed ``.to(device)``: the worker group that does not move the network."""
    monkeypatch.setattr(LocalGroup, "prepare", lambda self, net, device: net)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        fit(pretrain_run(), fresh_wd(data_wd, tmp_path))


def test_an_ema_built_before_the_move_fails_the_first_cuda_step(data_wd, tmp_path, monkeypatch):
    """The crash the paper profile had: the EMA shadow copied while the network was on the host."""
    from rsseg.pretrain import trainer

    original = LocalGroup.prepare

    def early_ema(self, net, device):
        shadow = trainer.Ema(net, 0.999)  # on the host
        moved = original(self, net, device)
        monkeypatch.setattr(trainer, "Ema", lambda net, decay: shadow)
        return moved

    monkeypatch.setattr(LocalGroup, "prepare", early_ema)
    with pytest.raises(RuntimeError, match=r"same device.*aten\._foreach_mul_|same device"):
        fit(pretrain_run(), fresh_wd(data_wd, tmp_path))


def test_two_ranks_average_the_loss_on_the_device_and_sync_once_per_flush(data_wd, tmp_path):
    """A process group that takes device tensors only (NCCL): the step's loss is reduced where it
    is; the host waits for the device once per ``log_every`` steps, not once per step."""
    import simcuda

    run = pretrain_run(pretrain={**STEPS, "batch_size": 8, "runtime": {**STEPS["runtime"], "workers": 2, "log_every": 2,
                                                                          "checkpoint_every": 8}})
    per_step, read = [], []
    with simulated_cuda(world=2) as sim:
        trainer = Trainer(plan_of(run, fresh_wd(data_wd, tmp_path)), 0, 2, torch.device("cuda", 0), group=LocalGroup())
        step, after, read_scalars = trainer.step, trainer.after_step, trainer.read_scalars
        marks = []
        trainer.step = lambda *a: marks.append(simcuda.STATE.syncs.sites.copy()) or step(*a)
        trainer.after_step = lambda *a: after(*a) or per_step.append(sum(simcuda.STATE.syncs.since(marks[-1]).values()))
        trainer.read_scalars = lambda: read.append(read_scalars()) or read[-1]
        trainer.fit()
    # steps 2, 4, 6 read the kept scalars (one sync each); step 8 also checkpoints (host copies)
    assert per_step[:7] == [0, 1, 0, 1, 0, 1, 0], (per_step, dict(sim.syncs.sites))
    assert not any("trainer.py" in site and "(item)" in site for site in sim.syncs.sites)
    assert len(read) == 4 and all(np.isfinite(p["loss"]) for p in read)


def test_a_non_finite_loss_stops_pretraining_before_a_checkpoint(data_wd, tmp_path):
    run = pretrain_run(ddpm={"optim": {"lr": 1e30, "warmup_start_lr": 1e30, "warmup_iterations": 0}})
    wd = fresh_wd(data_wd, tmp_path)
    with pytest.raises(FloatingPointError, match=r"pre-training loss is (nan|inf) at step [1-4]"):
        fit(run, wd)
    assert not store.checkpoints(store.StoreDir.for_run(run, wd))


# ---------------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def pretrained(data_wd):
    """A finished tiny pre-training (on the CPU) in data_wd's store."""
    run = tiny_run(pretrain=PRETRAINED)
    Trainer(plan_of(run, data_wd), 0, 1, torch.device("cpu")).fit()
    return store.find(run, data_wd)


def counting_train_steps(monkeypatch) -> list[int]:
    """Host synchronisations of each fine-tuning training step (the flushes included)."""
    import simcuda

    per_step = []
    original = finetune.Finetuner.train_step

    def counted(self, it, batch):
        before = simcuda.STATE.syncs.sites.copy()
        original(self, it, batch)
        per_step.append(sum(simcuda.STATE.syncs.since(before).values()))

    monkeypatch.setattr(finetune.Finetuner, "train_step", counted)
    return per_step


@pytest.mark.parametrize("setting", ["frozen-cache-mlp", "trained-encoder", "upernet"])
def test_finetuning_on_cuda(setting, data_wd, pretrained, monkeypatch):
    over = {"frozen-cache-mlp": {"frozen": True, "head": "mlp", "augment": {"stretch": False}},
            "trained-encoder": {"frozen": False, "head": "mlp"},
            "upernet": {"frozen": True, "head": "upernet", "upernet": {"channels": 32, "auxiliary": True}}}[setting]
    run = tiny_run(**CUDA, finetune={"iterations": 12, "eval_every": 6, "batch_size": 4, **over})
    prepared = []
    original = finetune.prepare
    monkeypatch.setattr(finetune, "prepare", lambda *a, **k: prepared.append(original(*a, **k)) or prepared[-1])
    per_step = counting_train_steps(monkeypatch)
    with simulated_cuda():
        result = finetune.run(run, data_wd, pretrained=pretrained)
        again = finetune.run(run, data_wd, pretrained=pretrained) if setting == "frozen-cache-mlp" else None
    p = prepared[0]
    assert on_device(list(p.head.parameters())) and on_device(list(p.encoder.parameters()))
    assert np.isfinite(result.test.miou) and result.trainable_params > 0
    # a step waits for the device only when the cache writes features it computed (host copies)
    training = per_step[-12:]
    if setting == "frozen-cache-mlp":
        assert p.cached is not None and again.cache["cache/hit_rate"] == 1.0, (result.cache, again.cache)
        assert training == [0] * 12, training  # warm cache: reads from the host, copies to the device
    else:
        assert training == [0] * 12, training


def test_the_feature_cache_keeps_gpu_and_cpu_features_apart(data_wd, pretrained, tmp_path):
    """bf16 features computed on a GPU and fp32 features from a CPU never share entries."""
    wd = fresh_wd(data_wd, tmp_path)
    run = tiny_run(finetune={"iterations": 2, "eval_every": 2, "batch_size": 4, "augment": {"stretch": False}})
    on_cpu = finetune.run(run, wd, pretrained=pretrained)
    assert on_cpu.cache["cache/parts_computed"] > 0 and finetune.run(run, wd, pretrained=pretrained).cache["cache/hit_rate"] == 1.0
    with simulated_cuda():
        on_gpu = finetune.run(tiny_run(**CUDA, finetune=run.finetune.model_dump()), wd, pretrained=pretrained)
    # the GPU run computes every part the CPU run computed (none of the CPU's entries is served to it)
    assert on_gpu.cache["cache/parts_computed"] == on_cpu.cache["cache/parts_computed"]
    assert on_gpu.cache["cache/parts_read"] == on_cpu.cache["cache/parts_read"]  # its own re-reads within the run


@pytest.mark.parametrize("method,over", [("convnext_random", {"convnext": {"size": "pico"}}),
                                         ("segformer", {"segformer": {"size": "pico"}})])
def test_baseline_fine_tuning_on_cuda(method, over, data_wd, monkeypatch):
    run = tiny_run(**CUDA, method=method, data={"tile_size": 64}, **over,
                   finetune={"iterations": 4, "eval_every": 4, "batch_size": 2, "frozen": False, "head": "auto"})
    per_step = counting_train_steps(monkeypatch)
    with simulated_cuda():
        result = finetune.run(run, data_wd)
    assert np.isfinite(result.test.miou) and per_step == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------- models, prediction


def test_a_saved_model_loads_on_cuda_and_predicts_a_whole_scene(data_wd, pretrained, tmp_path):
    import rasterio

    from rsseg import runner
    from rsseg.models import load_model
    from rsseg.predict import predict_scene

    from rasters import write_tif

    with rasterio.open(RGB_BYTE) as src:  # a crop of the Landsat scene, nodata corner included
        scene = write_tif(tmp_path / "crop.tif", src.read(window=rasterio.windows.Window(0, 0, 150, 110)), nodata=0,
                          crs=src.crs, transform=src.transform)
    run = tiny_run(pretrain=PRETRAINED, finetune={"iterations": 2, "eval_every": 2, "log_predictions": 0})
    _, tracker = runner.execute(run, data_wd, profile="test", pretrained=pretrained)
    on_cpu = load_model(f"runs:/{tracker.run_id}", data_wd)
    with simulated_cuda():
        model = load_model(f"runs:/{tracker.run_id}", data_wd, device="cuda")
        assert model.device.type == "cuda" and on_device(list(model.head.parameters()))
        out = predict_scene(model, scene, tmp_path / "gpu")
        x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
        gpu_logits = host(model.logits(x, ["a", "b"]))
    with rasterio.open(out.classes) as f:
        classes = f.read(1)
    assert classes.shape == (110, 150) and (classes == 255).any() and (classes[classes != 255] < model.num_classes).all()
    torch.testing.assert_close(gpu_logits, on_cpu.logits(x, ["a", "b"]), atol=0.25, rtol=0.05)  # bf16 vs fp32


# ---------------------------------------------------------------------------------------------- the baselines' objectives


@pytest.mark.parametrize("kind", ["mae", "scalemae", "ma3e"])
def test_baseline_objectives_step_on_cuda_without_waiting_for_the_device(kind, synthetic_tiles):
    from rsseg_baselines.ma3e.objective import Ma3eObjective
    from rsseg_baselines.ma3e.spec import Ma3eSpec
    from rsseg_baselines.vit.objective import MaeObjective, ScaleMaeObjective
    from rsseg_baselines.vit.spec import MaeSpec, ScaleMaeSpec

    tiles = synthetic_tiles[:8]
    with simulated_cuda() as sim:
        obj = {"mae": lambda: MaeObjective(MaeSpec(size="pico"), 32, 3),
               "scalemae": lambda: ScaleMaeObjective(ScaleMaeSpec(size="pico"), 32, 3, gsd=1.0),
               "ma3e": lambda: Ma3eObjective(Ma3eSpec(size="pico", window=2), 32, 3)}[kind]()
        net = obj.network.to("cuda")
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        images = tiles.to("cuda")
        before = sim.syncs.total
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, logs = obj.loss(net, images, torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        assert sim.syncs.total == before, dict(sim.syncs.sites)
        assert loss.device.type == "cuda" and all(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in logs.values())
        assert all(p.grad is None or on_device(p.grad) for p in net.parameters())


# ---------------------------------------------------------------------------------------------- bench/gpu_check.py

NOT_ON_A_GPU_BOX = ("ray", "mlflow", "rasterio", "polars", "optuna")  # the GPU image lacks these (docs/benchmarks.md)


def test_gpu_check_smoke_runs_on_the_cpu_without_the_orchestration_packages(tmp_path):
    """`python bench/gpu_check.py --smoke` as a user runs it, with Ray, MLflow, rasterio, polars and
    Optuna made unimportable (a GPU machine's image has none of them): every item runs, the
    figures are JSON lines, the rates file is what the dry run reads."""
    import json
    import subprocess
    import sys

    from conftest import REPO
    from rsseg.sweep.cost import Rates

    blocker = (
        "import importlib.abc, runpy, sys\n"
        f"BLOCK = {NOT_ON_A_GPU_BOX!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCK: raise ImportError(f'{name} is not on a GPU machine')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['gpu_check.py'] + sys.argv[1:]\n"
        f"runpy.run_path({str(REPO / 'bench' / 'gpu_check.py')!r}, run_name='__main__')\n")
    rates = tmp_path / "rates.json"
    out = subprocess.run([sys.executable, "-c", blocker, "--smoke", "--rates", str(rates)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    items = {d["item"]: d for d in map(json.loads, out.stdout.strip().splitlines())}
    assert {"device", "peak", "pretrain", "extraction", "finetune", "evaluation", "finetune_online", "predict", "done"} <= set(items)
    assert items["pretrain"]["ema"] and items["pretrain"]["images_per_s"] > 0 and items["done"]["failed"] == []
    assert items["extraction"]["early_exit_speedup"] > 1.0  # the 1/1 decoder level never runs
    loaded = Rates.load(rates)
    assert set(loaded.flops_per_s) == {"pretrain", "extraction", "finetune", "evaluation"} and "measured on cpu" in loaded.source


def test_gpu_check_runs_through_the_simulated_gpu(tmp_path):
    """The same script with a CUDA device (simulated): nothing in it mixes host and device."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    gpu_check.RESULTS.clear()
    with simulated_cuda():
        rc = gpu_check.main(["--smoke", "--rates", str(tmp_path / "rates.json")])
    assert rc == 0, {k: v for k, v in gpu_check.RESULTS.items() if v.get("ok") is False}
    assert gpu_check.RESULTS["device"]["name"] == "Simulated CUDA (CPU)" and gpu_check.RESULTS["pretrain"]["precision"] == "bf16"
