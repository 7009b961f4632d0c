"""The ``platform`` command. It parses arguments and delegates to library functions; nothing here
computes anything a Ray trial or a test could not call directly.

Errors a user can cause print as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup

import rsseg
from rsseg.errors import RssegError


# typer vendors its own click: its usage errors are typer.BadParameter's base class, not click's
UsageError = typer.BadParameter.__mro__[1]


def _usage_line(exc, fallback: str):
    if type(exc).__name__ == "NoArgsIsHelpError":  # `platform`, `platform data`: the help, as asked
        typer.echo(exc.format_message())
        raise typer.Exit(code=0) from None
    cmd = exc.ctx.command_path if exc.ctx is not None else fallback
    typer.echo(f"error: {cmd}: {exc.format_message()} (see `{cmd} --help`)", err=True)
    raise typer.Exit(code=2) from None


class _Group(TyperGroup):
    """Turns user errors into one line on stderr and exit status 2 (also under CliRunner)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:  # `platform --nosuch`: the group's own options
            _usage_line(exc, info_name or "platform")

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # one line too, not click's usage text and boxed message
            _usage_line(exc, ctx.command_path)
        except RssegError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except OSError as exc:
            from rsseg.diskspace import no_space_message
            from rsseg.errors import disk_full_path

            path = disk_full_path(exc)
            if path is None:
                raise
            typer.echo(f"error: {no_space_message(path, ctx.invoked_subcommand or ctx.info_name)}", err=True)
            raise typer.Exit(code=2) from None


app = typer.Typer(
    name="platform",
    cls=_Group,
    help="rsseg: diffusion-feature segmentation of remote-sensing imagery, from pre-training to the paper's tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: the rich panels showed every flag as "<bool>" and lists as "<list[str]>"
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect configuration files.", no_args_is_help=True, rich_markup_mode=None)
data_app = typer.Typer(help="Datasets: build tile indexes, print what a dataset holds.", no_args_is_help=True, rich_markup_mode=None)
weights_app = typer.Typer(help="Released weights: import them once into the checkpoint store, list, export.", no_args_is_help=True, rich_markup_mode=None)
models_app = typer.Typer(help="Trained segmentors saved by fine-tuning runs.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(weights_app, name="weights")
app.add_typer(models_app, name="models")

SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a key: --set finetune.iterations=100 (repeatable).")
ProfileOpt = typer.Option(None, "--profile", "-p", help="Profile from sweeps/profiles/ merged over the file: small (tiny networks and iterations, keeps your data), smoke (small + the built-in synthetic data in place of the file's), paper (full scale on GPUs).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rsseg {rsseg.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    workdir: Optional[str] = typer.Option(
        None, "--workdir", "-w", envvar="RSSEG_WORKDIR",
        help="Where everything the platform writes goes (default ./rsseg-work); on a cluster, each node's scratch.",
    ),
    storage: Optional[str] = typer.Option(
        None, "--storage", envvar="RSSEG_STORAGE",
        help="On a cluster: a directory every node mounts (NFS) or s3://bucket/prefix, for checkpoints, models and Ray's storage (default: the workdir; docs/cluster.md).",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    from rsseg.workdir import Workdir

    # Checked here (one line, exit 2) and exported so that Ray workers and subprocesses resolve
    # the same absolute directories.
    Workdir.resolve(workdir, storage).check().export()


def _show_profile_changes(document) -> None:
    """A profile's changes to the user's own file, one line each, before anything runs: a value
    written in the file and replaced by the profile is never silent."""
    for line in document.profile_changes:
        typer.echo(line)


def _workdir():
    from rsseg.workdir import Workdir

    return Workdir.resolve()


# ----------------------------------------------------------------------------------------------
# config


@config_app.command("show")
def config_show(
    file: Path = typer.Argument(..., help="A run spec or a sweep file."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Print the fully resolved config: file + profile + --set, every default filled in."""
    from rsseg.runspec import show

    typer.echo(show(file, profile, set_ or []), nl=False)


# ----------------------------------------------------------------------------------------------
# data


def _data_spec(dataset: str, root: Optional[Path], tile_size: Optional[int], spec_file: Optional[Path],
               profile: Optional[str], set_: Optional[list[str]]):
    from rsseg.config.loader import Document, apply_overrides, read_yaml, validate
    from rsseg.config.profiles import is_sweep_document
    from rsseg.config.specs import DataSpec
    from rsseg.data.datasets import unknown_dataset
    from rsseg.errors import ConfigError
    from rsseg.runspec import load_run, load_sweep

    if spec_file is not None:
        raw = read_yaml(spec_file)
        if is_sweep_document(raw):
            return load_sweep(spec_file, profile, [f"base.{s}" for s in set_ or []]).base.data
        return load_run(spec_file, profile, set_ or []).spec.data
    data: dict = {"dataset": dataset}
    if root is not None:
        data["root"] = str(root)
    if tile_size is not None:
        data["tile_size"] = tile_size
    doc = Document(data=data, origin="command line")
    apply_overrides(doc, [s[len("data."):] if s.startswith("data.") else s for s in set_ or []])
    spec = validate(DataSpec, doc)
    if problem := unknown_dataset(spec.dataset):
        raise ConfigError(f"command line: dataset: {problem}")
    return spec


DatasetArg = typer.Argument("synthetic", help="synthetic | minifrance | gid | folder | one an installed package registers")
RootOpt = typer.Option(None, "--root", help="Dataset root directory.")
TileOpt = typer.Option(None, "--tile-size", help="Tile side in pixels (default 256).")
SpecOpt = typer.Option(None, "--spec", help="Take the data block from this run spec or sweep file instead.")
DataSetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Data option: --set gid.level=coarse --set bands=[2,3,4] (repeatable).")


@data_app.command("prepare")
def data_prepare(
    dataset: str = DatasetArg, root: Optional[Path] = RootOpt, tile_size: Optional[int] = TileOpt,
    spec: Optional[Path] = SpecOpt, profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = DataSetOpt,
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild the tile index even if it is current."),
) -> None:
    """Generate the synthetic data if needed and build the tile index (cached as parquet)."""
    from rsseg.data import tiles

    data = _data_spec(dataset, root, tile_size, spec, profile, set_)
    index = tiles.build(data, _workdir(), rebuild=rebuild)
    typer.echo(f"{index.scenes.dataset}: {len(index.scenes.scenes)} scenes, {index.frame.height} tiles -> {index.path}")


@data_app.command("info")
def data_info(
    dataset: str = DatasetArg, root: Optional[Path] = RootOpt, tile_size: Optional[int] = TileOpt,
    spec: Optional[Path] = SpecOpt, profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = DataSetOpt,
) -> None:
    """Scenes, tiles per split and label-ratio subset, and the class histogram of a dataset."""
    from rsseg.data import tiles
    from rsseg.data.info import describe

    data = _data_spec(dataset, root, tile_size, spec, profile, set_)
    index = tiles.build(data, _workdir())
    typer.echo(describe(index, data), nl=False)


# ----------------------------------------------------------------------------------------------
# pretrain


@app.command("pretrain")
def pretrain_cmd(
    spec: Path = typer.Argument(..., help="A run spec, e.g. sweeps/pretrain.yaml."),
    workers: Optional[int] = typer.Option(None, "--workers", "-n", help="Ray Train workers (DDP); default pretrain.runtime.workers."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Train on GPUs (NCCL; = --set runtime.device=cuda) or CPUs (gloo)."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Resume from this checkpoint (must match the spec's fingerprint)."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: a local cluster)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
) -> None:
    """DDPM (or another method's) pre-training on Ray Train: two-step, resumable, fingerprinted.

    Trains only if no finished checkpoint with this spec's fingerprint exists; re-running an
    interrupted spec resumes from its last checkpoint.
    """
    from rsseg.checkpoints import store
    from rsseg.errors import ConfigError
    from rsseg.resolved import resolve
    from rsseg.runspec import load_run

    overrides = list(set_ or [])
    if workers is not None:
        overrides.append(f"pretrain.runtime.workers={workers}")
    if gpu is not None:
        overrides.append(f"runtime.device={'cuda' if gpu else 'cpu'}")
    loaded = load_run(spec, profile, overrides)
    _show_profile_changes(loaded.document)
    res = resolve(loaded.spec, profile)  # the one place this run is resolved: the stages below derive nothing
    run = res.spec
    _check_runnable(res, spec)
    if res.pretraining is None:
        raise ConfigError(f"{spec}: method {run.method!r} is not pre-trained by the platform (nothing to pre-train)")
    wd = _workdir()
    found = store.find(run, wd)
    if found is not None:
        typer.echo(f"already pre-trained: fingerprint {res.fingerprint}\n  checkpoint {found.path}\n  MLflow run {found.mlflow_run_id}")
        return
    n = run.pretrain.runtime.workers
    result = _pretrained(res, wd, address, announce=f"({run.pretrain.iterations.n_total} iterations, {n} worker{'s' if n != 1 else ''})",
                         resume_from=resume_from, tracking_uri=tracking_uri)
    typer.echo(f"finished: fingerprint {res.fingerprint}\n  checkpoint {result.path}\n  MLflow run {result.mlflow_run_id}")


# ----------------------------------------------------------------------------------------------
# finetune


def _check_runnable(res, spec: Path) -> None:
    """What a sweep would skip or refuse at plan time, for a single (resolved) run: before anything starts."""
    from rsseg.errors import ConfigError

    run = res.spec
    reason = run.plugin.unavailable_reason(run)
    if reason:
        raise ConfigError(f"{spec}: {reason.removesuffix(', so its cells are skipped')}")
    problems = run.plugin.preflight_problems(run)
    if problems:
        raise ConfigError(f"{spec}: {problems[0][0]}: {problems[0][1]}")
    from rsseg.checkpoints import store
    from rsseg.pretrain.data import data_problems, dataset_problems

    # what the sweep plan asks too: the dataset always, the other imagery of a pre-training still to do
    pending = res.pretraining is not None and store.find(run, _workdir()) is None
    found = data_problems(run) if pending else dataset_problems(run.data)
    if found:
        raise ConfigError(f"{spec}: {found[0]}")


def _pretrained(res, wd, address: Optional[str], announce: str = "first (not in the store yet)", **train_kwargs):
    """The (resolved) run's pre-training from the store; trained first on Ray if missing (the
    CLI's one find-or-train); None if the method needs none."""
    from rsseg import kernels, raycluster
    from rsseg.checkpoints import store
    from rsseg.pretrain.ensure import ensure_pretrained
    from rsseg.progress import done

    run = res.spec
    if res.pretraining is None or store.find(run, wd) is not None:
        return ensure_pretrained(res, wd)
    kernels.pin(run.runtime.cpu_kernels)  # before the local cluster starts: its workers inherit the path
    if not raycluster.local_mode(run.pretrain.runtime.workers, address=address):  # local mode needs no cluster
        raycluster.init(address, warm=("mlflow", *run.plugin.imports))  # what the pre-training's driver imports next
    typer.echo(f"pre-training {run.method} {res.fingerprint} {announce}")
    found = ensure_pretrained(res, wd, progress=True, **train_kwargs)
    done()
    return found


@app.command("finetune")
def finetune_cmd(
    spec: Path = typer.Argument(..., help="A run spec, e.g. sweeps/finetune.yaml."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster for the pre-training, if one is needed."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment (default tracking.experiment or rsseg-finetune)."),
) -> None:
    """One fine-tuning run: pre-training through the fingerprinted store (trained on Ray if
    missing), frozen or full fine-tuning, val/test mIoU, per-class IoU and artifacts in MLflow."""
    from rsseg import runner, tracking
    from rsseg.resolved import resolve
    from rsseg.runspec import load_run

    loaded = load_run(spec, profile, set_ or [])
    _show_profile_changes(loaded.document)
    res = resolve(loaded.spec, profile)  # the one place this run is resolved: the stages below derive nothing
    _check_runnable(res, spec)
    wd = _workdir()
    uri = tracking.resolve_uri(tracking_uri or res.spec.tracking.uri, wd)
    tracking.init_store(uri)
    pretrained = _pretrained(res, wd, address, tracking_uri=uri)
    if pretrained is not None:
        typer.echo(f"features from pre-training {pretrained.fingerprint} ({pretrained.path})")
    result, tracker = runner.execute(res, wd, uri=uri, experiment=experiment, pretrained=pretrained, progress=True)
    from rsseg.progress import done

    done()
    iou = "  ".join(f"{a} {100 * v:.1f}" for a, v in zip(result.class_abbrs, result.test.iou) if v == v)
    typer.echo(f"test mIoU {100 * result.test.miou:.2f} %  pixel accuracy {100 * result.test.pixel_accuracy:.2f} %  "
               f"({result.head} head, {result.trainable_params / 1e6:.2f} M trainable parameters, {result.seconds['total_s']:.0f} s)")
    typer.echo(f"per-class IoU  {iou}")
    for name, ref in result.references.items():
        typer.echo(f"reference: the {name} classifier reaches test mIoU {100 * ref.miou:.2f} % on the same split and labels "
                   f"({100 * (result.test.miou - ref.miou):+.2f} points for this run"
                   + ("; if it beats the run, the pre-training did not pay off on this data)" if name == "texture" else ")"))
    typer.echo(f"MLflow run {tracker.run_id} in {uri}")


@app.command("viz", short_help="Figs. 5 and 6 for a checkpoint: t-SNE and k-means maps of its features.")
def viz_cmd(
    spec: Path = typer.Argument(..., help="A DDPM run spec, e.g. sweeps/finetune.yaml (its checkpoint, data and features)."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Path = typer.Option(Path("viz"), "--out", "-o", help="Directory for the PNGs."),
    tiles: int = typer.Option(8, "--tiles", min=1, help="Labelled test tiles to read."),
    points: int = typer.Option(2000, "--points", min=50, help="Pixels in the t-SNE (classes balanced)."),
    timesteps: str = typer.Option("0,50,100,150,200", "--timesteps", help="Noise levels of the k-means maps, comma-separated."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster for the pre-training, if one is needed."),
) -> None:
    """Figs. 5 and 6 for a checkpoint: t-SNE of encoder vs decoder features per class, and k-means
    maps of decoder features at several noise levels (PNGs)."""
    from rsseg.errors import ConfigError
    from rsseg.featureviz import check_viz, run_viz
    from rsseg.runspec import load_run

    try:
        ts = [int(t) for t in timesteps.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--timesteps: {timesteps!r} is not a comma-separated list of integers") from None
    if not ts or min(ts) < 0:
        raise ConfigError(f"--timesteps: {timesteps!r}: expected non-negative timesteps such as 0,50,100,150 (0 = the clean image)")
    from rsseg.resolved import resolve

    res = resolve(load_run(spec, profile, set_ or []).spec, profile)
    run = res.spec
    check_viz(run, ts, "--timesteps")  # before a pre-training it would start
    wd = _workdir()
    pretrained = _pretrained(res, wd, address)
    r = run_viz(run, wd, out, tiles=tiles, points=points, timesteps=ts, pretrained=pretrained)
    typer.echo(f"silhouette of the classes: encoder {r['silhouette_encoder']:.3f}, decoder {r['silhouette_decoder']:.3f}")
    typer.echo("k-means vs labels (adjusted Rand index): " + ", ".join(f"t={t} {v:.3f}" for t, v in r["ari"].items()))
    typer.echo(f"wrote {r['tsne']} and {r['kmeans']}")


# ----------------------------------------------------------------------------------------------
# sweep, ui


@app.command("sweep")
def sweep_cmd(
    file: Path = typer.Argument(..., help="A sweep file, e.g. sweeps/noise_ablation.yaml."),
    profile: Optional[str] = ProfileOpt,
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a key of the sweep file: --set base.finetune.iterations=50 --set search.max_concurrent=1."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded plan, its estimated device-hours per stage, and start nothing."),
    rates: Optional[Path] = typer.Option(None, "--rates", help="With --dry-run: per-stage rates measured by bench/gpu_check.py --rates FILE "
                                                              "(default: an assumed GPU, said in the output)."),
    resume: bool = typer.Option(False, "--resume", help="Continue this sweep's last invocation after its driver died."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: a local cluster)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default sqlite in the workdir)."),
) -> None:
    """Run a paper experiment as a Ray Tune sweep (grid or Optuna), every trial an MLflow run."""
    from rsseg.runspec import load_sweep
    from rsseg.sweep import plan as planning

    if rates is not None and not dry_run:
        from rsseg.errors import ConfigError

        raise ConfigError(f"--rates {rates}: only read by --dry-run (the device-hours estimate)")
    loaded = load_sweep(file, profile, set_ or [])
    _show_profile_changes(loaded.document)
    if dry_run:
        from rsseg.sweep import cost, passes
        from rsseg.workdir import Workdir

        bill = cost.load_rates(rates)
        plan = planning.make_plan(loaded, networks=True)
        typer.echo(planning.describe(plan), nl=False)
        typer.echo(passes.describe(passes.count(plan, Workdir.resolve())))
        typer.echo(cost.describe(plan, Workdir.resolve(), bill), nl=False)
        return
    from rsseg.sweep.driver import run_sweep
    from rsseg.sweep.record import summary_table

    try:
        result = run_sweep(loaded, _workdir(), address=address, tracking_uri=tracking_uri, resume=resume)
    except KeyboardInterrupt:
        import shlex

        again = ["platform"] + [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
        typer.echo(f"interrupted: the sweep's runs are marked KILLED; continue it with: {shlex.join(again)}", err=True)
        raise
    typer.echo(summary_table(result, loaded.spec.search.metric, loaded.spec.search.mode), nl=False)
    if result.failed or result.finished == 0:
        from collections import Counter

        # a sweep with failed trials is not a success for a script or CI: how many, and why (each reason once)
        reasons = Counter(t.get("error") or "no reason recorded" for t in result.trials if t["status"] == "FAILED")
        for reason, n in reasons.most_common():
            typer.echo(f"failed: {n} trial(s): {reason}", err=True)
        raise typer.Exit(code=1)


# ----------------------------------------------------------------------------------------------
# weights, models, predict, evaluate


@weights_app.command("import")
def weights_import(
    path: Path = typer.Argument(..., help="A DDPM-CD *_gen.pth, or a diffusers UNet2DModel directory."),
    fmt: str = typer.Option(..., "--format", help="ddpm-cd | diffusers | vitmae | scalemae (what the installed methods read)."),
    name: str = typer.Option(..., "--name", help="The name runs use: ddpm.features.weights=NAME or pretrain.init=NAME."),
    norm_groups: Optional[int] = typer.Option(None, "--norm-groups", min=1, help="ddpm-cd: the network's GroupNorm groups "
                                              "(a state dict cannot say; default DDPM-CD's 32)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="ddpm-cd: the schedule its features are read under: "
                                           "ddpm_cd (default: DDPM-CD's change-detection one), ddpm, or checkpoint (its saved betas)."),
) -> None:
    """Convert released weights once into the checkpoint store (fingerprinted by the file's hash)."""
    from rsseg.weights import import_weights

    from rsseg.checkpoints import store

    wd = _workdir()
    found, new = import_weights(path, fmt, name, wd, {"norm_groups": norm_groups, "schedule": schedule})
    typer.echo(f"{'imported' if new else 'already imported'}: {name} ({found.method}, {found.fingerprint}) -> {found.path}")
    for note in next((r.get("notes", []) for r in store.list_imported(wd) if r.get("name") == name), []):
        typer.echo(f"  {note}")


@weights_app.command("list")
def weights_list() -> None:
    """Imported weights: name, method, format, fingerprint, source."""
    from rsseg.checkpoints import store

    rows = store.list_imported(_workdir())
    if not rows:
        typer.echo("no imported weights (platform weights import PATH --format ... --name NAME)")
    for r in rows:
        typer.echo(f"{r['name']:<24} {r['method']:<8} {r['format']:<10} {r['fingerprint']}  {r['source']}")


@weights_app.command("export")
def weights_export(
    name: str = typer.Argument(..., help="Imported weights' name, or a pre-training fingerprint."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write (diffusers save_pretrained layout)."),
) -> None:
    """Write DDPM weights (imported or pre-trained here) as a diffusers UNet2DModel directory."""
    from rsseg.methods.ddpm.weights import export_diffusers
    from rsseg.checkpoints import store

    wd = _workdir()
    found = store.find_imported(wd, name)
    if found is None:
        matches = sorted((wd.checkpoints / "pretrain").glob(f"ddpm-{name}*/final.pt"))
        if not matches:
            from rsseg.errors import CheckpointError

            raise CheckpointError(f"{name!r}: neither imported weights nor a DDPM pre-training fingerprint in {wd.checkpoints}")
        sdir = store.StoreDir(matches[0].parent)
        found = store.Pretrained(sdir.final, sdir.fingerprint, "ddpm")
    export_diffusers(found.load(), out)
    typer.echo(f"wrote {out}")


@models_app.command("list")
def models_list() -> None:
    """Saved models of the work directory: run id, method, dataset, test mIoU."""
    from rsseg.models import list_models

    rows = list_models(_workdir())
    if not rows:
        typer.echo("no saved models yet (every fine-tuning run saves one)")
    for r in rows:
        typer.echo(f"runs:/{r['run_id']}  {r['method']:<16} {r['dataset']:<11} {r['head']:<8} "
                   f"{'fine-tuned' if r['finetuned'] else 'frozen':<10} test mIoU {100 * r['mIoU']:.1f} %")


ModelArg = typer.Argument(..., help="runs:/<run id>, best:<experiment> (its best validation mIoU) or a saved model directory.")
DeviceOpt = typer.Option(None, "--device", help="auto | cpu | cuda (default: the model's runtime.device).")


@app.command("predict")
def predict_cmd(
    model: str = ModelArg,
    scenes: list[str] = typer.Argument(..., help="GeoTIFFs, folders or globs; 'dataset:N' = the N-th labelled scene of the model's own dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Window overlap in pixels (default: a quarter tile)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Windows per forward."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write per-class probabilities (uint8 x 255)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist."),
    quicklook: bool = typer.Option(False, "--quicklook", help="Also write a PNG of each class map with a legend."),
    bands: Optional[str] = typer.Option(None, "--bands", metavar="B,B,B",
                                        help="1-based bands of the scenes to read, as many as the model was trained on, e.g. 4,3,2 "
                                             "(default: the model's)."),
    value_range: Optional[str] = typer.Option(None, "--value-range", metavar="LO,HI",
                                              help="Raw pixel range mapped to the model's input range, e.g. 0,4095 for 12-bit "
                                                   "imagery (default: the model's, else the scene's data type)."),
    device: Optional[str] = DeviceOpt,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow store holding the run."),
) -> None:
    """Map whole scenes with a trained segmentor: sliding windows, blended, into georeferenced COGs."""
    from rsseg.models import load_model
    from rsseg.predict import predict_scene, quicklook as make_quicklook, scenes_of
    from rsseg.progress import done

    from rsseg.errors import DataError

    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file; expected a directory for the class maps (it is created if missing)")
    bad = [s for s in scenes if s.startswith("dataset:") and not s.split(":", 1)[1].isdigit()]
    if bad:
        raise DataError(f"{bad[0]}: expected dataset:N, N the number of a labelled scene of the model's dataset (0, 1, ...)")
    band_list = _number_list("--bands", bands, int, "1-based band numbers, e.g. --bands 4,3,2") if bands else None
    vrange = _number_list("--value-range", value_range, float, "two numbers LO,HI, e.g. --value-range 0,4095") if value_range else None
    if vrange is not None and (len(vrange) != 2 or not vrange[0] < vrange[1]):
        raise DataError(f"--value-range {value_range}: expected two numbers LO,HI with LO < HI, e.g. --value-range 0,4095")
    wd = _workdir()
    loaded = load_model(model, wd, device=device, tracking_uri=tracking_uri)
    paths = []
    for s in scenes:
        if s.startswith("dataset:"):
            from rsseg.data import registry

            found = registry.scenes(loaded.run.data, wd).labelled
            paths.append(found[int(s.split(":", 1)[1]) % len(found)].image)
        else:
            paths += scenes_of([s])
    from rsseg.predict import output_stems

    for scene, stem in zip(paths, output_stems(paths)):
        r = predict_scene(loaded, scene, out, overlap=overlap, batch_size=batch_size, probabilities=probabilities,
                          overwrite=overwrite, progress=True, bands=band_list, value_range=tuple(vrange) if vrange else None,
                          stem=stem)
        done()
        for note in r.warnings:
            typer.echo(f"warning: {note}", err=True)
        extra = ""
        if quicklook:
            png = make_quicklook(r.classes, r.classes.with_suffix(".png"), loaded.meta["classes"]["names"], loaded.meta["classes"]["colors"])
            extra = f" + {png.name}"
        typer.echo(f"{scene} -> {r.classes}{' + ' + r.probabilities.name if r.probabilities else ''}{extra} "
                   f"({r.windows} windows, {r.windows / max(r.seconds, 1e-9):.1f} tiles/s)")


def _number_list(option: str, text: str, kind: type, expected: str) -> list:
    """``4,3,2`` -> [4, 3, 2]; anything else is one line naming the option."""
    from rsseg.errors import DataError

    try:
        values = [kind(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if not values:
        raise DataError(f"{option} {text}: expected {expected}")
    return values


@app.command("evaluate")
def evaluate_cmd(
    model: str = ModelArg,
    dataset: str = typer.Option(..., "--data", help="synthetic | minifrance | gid | folder: the labelled scenes to score."),
    root: Optional[Path] = RootOpt,
    set_: Optional[list[str]] = DataSetOpt,
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Window overlap in pixels (default: a quarter tile)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    device: Optional[str] = DeviceOpt,
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
) -> None:
    """mIoU and per-class IoU of a saved model over whole labelled scenes (an MLflow run)."""
    from rsseg.evaluate import evaluate_scenes
    from rsseg.models import load_model
    from rsseg.progress import done

    wd = _workdir()
    loaded = load_model(model, wd, device=device, tracking_uri=tracking_uri)
    data = _data_spec(dataset, root, loaded.tile_size, None, None, set_)
    r = evaluate_scenes(loaded, data, wd, overlap=overlap, batch_size=batch_size, tracking_uri=tracking_uri, progress=True)
    done()
    iou = "  ".join(f"{a} {100 * v:.1f}" for a, v in zip(r.abbrs, r.metrics.iou) if v == v)
    typer.echo(f"mIoU {100 * r.metrics.miou:.2f} % over {r.scenes} scene(s), {r.windows} windows; MLflow run {r.run_id}")
    typer.echo(f"per-class IoU  {iou}")


@app.command("methods")
def methods_cmd() -> None:
    """The installed methods (plugins of the rsseg.methods entry-point group)."""
    from importlib import metadata

    from rsseg.methods import ENTRY_POINT_GROUP, registry

    where = {ep.name: ep.value.split(":")[0] for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    rows = []
    for name, m in sorted(registry().items()):
        rows.append((name, "yes" if m.pretrained else "no", f"{m.heads[0]} / {m.heads[1]}", m.block or "-",
                     where.get(name, "rsseg (built in)"), m.summary))
    header = ("method", "pre-trained", "heads frozen / ft", "config block", "from", "summary")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    for r in [header] + rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])


@app.command("tables")
def tables_cmd(
    out: Path = typer.Option(Path("tables"), "--out", "-o", help="Directory for the tables (Markdown, LaTeX, CSV) and figures (PNG, CSV)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="Read this store or server instead of the workdir's."),
    experiment: Optional[list[str]] = typer.Option(None, "--experiment", "-e", metavar="NAME", help="Only runs of this experiment (repeatable; default: all)."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Only runs of this profile (default: the latest run's)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Only runs on this dataset (default: the latest run's)."),
) -> None:
    """Tables 1-5 and Figures 9-10 from the finished runs in MLflow, beside the paper's numbers."""
    from rsseg import tracking
    from rsseg.tables.build import build_all

    uri = tracking.resolve_uri(tracking_uri, _workdir())
    report = build_all(uri, out, experiments=experiment or None, profile=profile, dataset=dataset)
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    for tid, b in report.built.items():
        filled = sum(1 for r, _ in b.rows for c, _ in b.columns if b.cell(r, c).n)
        group = ", ".join(f"{k} {v or 'none'}" for k, v in b.group.items())
        typer.echo(f"{tid:7s} {b.n_runs:4d} run(s), {filled:3d} cell(s) of ours" + (f"  [{group}]" if group else ""))
    typer.echo(f"wrote {len(report.files)} files to {out}/ (all tables in {out / 'tables.md'})")
    from rsseg.tables.publish import publish

    for name, run_id in publish(uri, report).items():
        typer.echo(f"logged to MLflow: experiment {name!r}, run 'tables' {run_id}")


@app.command("ui")
def ui_cmd(
    port: int = typer.Option(5000, "--port", help="Port for the MLflow UI."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (127.0.0.1: this machine only; the UI has no login)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server worker processes."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="Show this store or server instead of the workdir's."),
) -> None:
    """The MLflow UI on the work directory's store (or the URL of a shared server)."""
    import os

    from rsseg import ui
    from rsseg.errors import ConfigError

    cap = max(4, 2 * (os.cpu_count() or 1))  # a UI for a few people: more processes only take memory
    if workers > cap:
        raise ConfigError(f"--workers {workers}: at most {cap} on this machine ({os.cpu_count()} CPUs); the UI needs 1-2")
    status = ui.serve(_workdir(), port=port, tracking_uri=tracking_uri, host=host, workers=workers)
    if status:
        raise typer.Exit(code=status if 0 < status < 256 else 1)


@app.command("server")
def server_cmd(
    port: int = typer.Option(5000, "--port", help="Port of the tracking server."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind: 0.0.0.0 for a cluster's other nodes (no login: a private network only)."),
    backend_store_uri: Optional[str] = typer.Option(None, "--backend-store-uri", help="The database: the workdir's SQLite store by default, or postgresql://user@host/db for a team."),
    artifacts_destination: Optional[str] = typer.Option(None, "--artifacts-destination", help="Where proxied artifacts go (default: beside a SQLite store, else <storage>/artifacts)."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Server worker processes."),
    allowed_hosts: Optional[str] = typer.Option(None, "--allowed-hosts", help="Host names clients may use (MLflow's default: localhost and private addresses)."),
) -> None:
    """An MLflow tracking server for a cluster or a team: every node writes its runs through it."""
    from rsseg import server

    status = server.serve(_workdir(), port=port, host=host, backend=backend_store_uri, artifacts=artifacts_destination,
                          workers=workers, allowed_hosts=allowed_hosts)
    if status:
        raise typer.Exit(code=status if 0 < status < 256 else 1)


# ----------------------------------------------------------------------------------------------


def _terminated(signum, _frame):
    raise KeyboardInterrupt  # SIGTERM ends a command like Ctrl-C: runs marked KILLED, the local cluster stopped


def _stop_local_ray() -> None:
    """The local Ray cluster this process started does not outlive it (its dashboard and runtime-env
    agents would keep running, re-parented to init)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
            from rsseg.raycluster import forget_session

            forget_session()
        except Exception:  # noqa: BLE001 - on the way out, nothing more to do
            pass


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except RssegError as exc:  # raised outside a command (argument callbacks)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        _stop_local_ray()


if __name__ == "__main__":  # pragma: no cover
    main()
