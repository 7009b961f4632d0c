"""The ``platform`` command. It parses arguments and delegates to library functions; nothing here
computes anything a Ray trial or a test could not call directly.

Errors a user can cause print as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup

import rsseg
from rsseg.errors import RssegError


class _Group(TyperGroup):
    """Turns user errors into one line on stderr and exit status 2 (also under CliRunner)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RssegError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None


app = typer.Typer(
    name="platform",
    cls=_Group,
    help="rsseg: diffusion-feature segmentation of remote-sensing imagery, from pre-training to the paper's tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect configuration files.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: build tile indexes, print what a dataset holds.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

SetOpt = typer.Option(None, "--set", help="Override a key: --set finetune.iterations=100 (repeatable).")
ProfileOpt = typer.Option(None, "--profile", "-p", help="Profile from sweeps/profiles/ merged over the file (smoke, paper).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rsseg {rsseg.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", "-w", envvar="RSSEG_WORKDIR",
        help="Where everything the platform writes goes (default ./rsseg-work; env RSSEG_WORKDIR).",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    from rsseg.workdir import Workdir

    # Exported so that Ray workers and subprocesses resolve the same absolute directory.
    Workdir.resolve(workdir).export()


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
    from rsseg.config.resolve import show

    typer.echo(show(file, profile, set_ or []), nl=False)


# ----------------------------------------------------------------------------------------------
# data


def _data_spec(dataset: str, root: Optional[Path], tile_size: Optional[int], spec_file: Optional[Path],
               profile: Optional[str], set_: Optional[list[str]]):
    from rsseg.config.loader import Document, apply_overrides, validate
    from rsseg.config.resolve import is_sweep_document, load_run, load_sweep, read_yaml
    from rsseg.config.specs import DataSpec

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
    return validate(DataSpec, doc)


DatasetArg = typer.Argument("synthetic", help="synthetic | minifrance | gid | folder")
RootOpt = typer.Option(None, "--root", help="Dataset root directory.")
TileOpt = typer.Option(None, "--tile-size", help="Tile side in pixels (default 256).")
SpecOpt = typer.Option(None, "--spec", help="Take the data block from this run spec or sweep file instead.")
DataSetOpt = typer.Option(None, "--set", help="Data option: --set gid.level=coarse --set bands=[2,3,4] (repeatable).")


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
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Train on GPUs (NCCL) or CPUs (gloo)."),
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
    from rsseg import raycluster
    from rsseg.config.resolve import load_run
    from rsseg.pretrain import store

    overrides = list(set_ or [])
    if workers is not None:
        overrides.append(f"pretrain.runtime.workers={workers}")
    if gpu is not None:
        overrides.append(f"pretrain.runtime.gpu={str(gpu).lower()}")
    run = load_run(spec, profile, overrides).spec
    wd = _workdir()
    fp = store.fingerprint(run)
    found = store.find(run, wd)
    if found is not None:
        typer.echo(f"already pre-trained: fingerprint {fp}\n  checkpoint {found.path}\n  MLflow run {found.mlflow_run_id}")
        return
    raycluster.init(address)
    typer.echo(f"pre-training {run.method} {fp} ({run.pretrain.iterations.n_total} iterations, {run.pretrain.runtime.workers} workers)")
    result = store.ensure(run, wd, progress=True, resume_from=resume_from, tracking_uri=tracking_uri, profile=profile)
    from rsseg.progress import done

    done()
    typer.echo(f"finished: fingerprint {fp}\n  checkpoint {result.path}\n  MLflow run {result.mlflow_run_id}")


# ----------------------------------------------------------------------------------------------
# finetune


def _pretrained(run, wd, address: Optional[str], **ensure_kwargs):
    """The run's pre-training from the store; trained first on Ray if missing; None if the method
    needs none."""
    from rsseg import raycluster
    from rsseg.methods import get
    from rsseg.pretrain import store
    from rsseg.progress import done

    if not get(run.method).needs_pretraining(run):
        return None
    found = store.find(run, wd)
    if found is not None:
        return found
    raycluster.init(address)
    typer.echo(f"pre-training {run.method} {store.fingerprint(run)} first (not in the store yet)")
    found = store.ensure(run, wd, progress=True, **ensure_kwargs)
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
    from rsseg.config.resolve import load_run

    run = load_run(spec, profile, set_ or []).spec
    wd = _workdir()
    uri = tracking.resolve_uri(tracking_uri or run.tracking.uri, wd)
    tracking.init_store(uri)
    pretrained = _pretrained(run, wd, address, tracking_uri=uri, profile=profile)
    if pretrained is not None:
        typer.echo(f"features from pre-training {pretrained.fingerprint} ({pretrained.path})")
    result, tracker = runner.execute(run, wd, uri=uri, experiment=experiment, tags=runner.run_tags(run, profile=profile),
                                     pretrained=pretrained)
    iou = "  ".join(f"{a} {100 * v:.1f}" for a, v in zip(result.class_abbrs, result.test.iou) if v == v)
    typer.echo(f"test mIoU {100 * result.test.miou:.2f} %  pixel accuracy {100 * result.test.pixel_accuracy:.2f} %  "
               f"({result.head} head, {result.trainable_params / 1e6:.2f} M trainable parameters, {result.seconds['total_s']:.0f} s)")
    typer.echo(f"per-class IoU  {iou}")
    typer.echo(f"MLflow run {tracker.run_id} in {uri}")


@app.command("viz")
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
    from rsseg.config.resolve import load_run
    from rsseg.errors import ConfigError
    from rsseg.featureviz import run_viz

    try:
        ts = [int(t) for t in timesteps.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--timesteps: {timesteps!r} is not a comma-separated list of integers") from None
    run = load_run(spec, profile, set_ or []).spec
    if max(ts, default=0) >= run.ddpm.schedule.train_steps:
        raise ConfigError(f"--timesteps: {max(ts)} is outside the schedule's 0..{run.ddpm.schedule.train_steps - 1}")
    wd = _workdir()
    pretrained = _pretrained(run, wd, address) if run.method == "ddpm" else None
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
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a key of the sweep file: --set base.finetune.iterations=50 --set search.max_concurrent=1."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the expanded plan and start nothing."),
    resume: bool = typer.Option(False, "--resume", help="Continue this sweep's last invocation after its driver died."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: a local cluster)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default sqlite in the workdir)."),
) -> None:
    """Run a paper experiment as a Ray Tune sweep (grid or Optuna), every trial an MLflow run."""
    from rsseg.config.resolve import load_sweep
    from rsseg.sweep import plan as planning

    loaded = load_sweep(file, profile, set_ or [])
    if dry_run:
        typer.echo(planning.describe(planning.make_plan(loaded)), nl=False)
        return
    from rsseg.sweep.driver import run_sweep, summary_table

    result = run_sweep(loaded, _workdir(), address=address, tracking_uri=tracking_uri, resume=resume)
    typer.echo(summary_table(result), nl=False)
    if result.finished == 0:
        raise typer.Exit(code=1)


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
    experiment: Optional[list[str]] = typer.Option(None, "--experiment", "-e", help="Only runs of this experiment (repeatable; default: all)."),
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


@app.command("ui")
def ui_cmd(
    port: int = typer.Option(5000, "--port", help="Port for the MLflow UI."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="Show this store or server instead of the workdir's."),
) -> None:
    """The MLflow UI on the work directory's store at 127.0.0.1 (or the URL of a shared server)."""
    from rsseg import ui

    ui.serve(_workdir(), port=port, tracking_uri=tracking_uri)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    try:
        app()
    except RssegError as exc:  # raised outside a command (argument callbacks)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
