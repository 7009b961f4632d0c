"""What a MAE / ScaleMAE run needs from its spec before any network exists: its GSD, its tags,
whether it pre-trains here or reads public weights, and whether those are imported (the hooks)."""

from __future__ import annotations

from rsseg.errors import ConfigError


def raster_gsd(run) -> float | None:
    """Ground sample distance in metres of the dataset's first labelled scene (None when it is
    not georeferenced)."""
    from rsseg.data import registry
    from rsseg.data.scenes import raster_meta

    meta = raster_meta(registry.scenes(run.data).labelled[0].image)
    if not (meta.georeferenced and meta.crs):
        return None
    from rasterio.crs import CRS

    size = abs(float(meta.transform[0]))  # pixel width in CRS units
    crs = CRS.from_string(meta.crs)
    # geographic CRS: degrees -> metres at the equator (the scale is a ratio; this is close enough)
    return size * 111_320.0 if crs.is_geographic else size * (crs.linear_units_factor[1] if crs.linear_units_factor else 1.0)


def run_gsd(run) -> float:
    """The ground sample distance a ScaleMAE run uses: ``scalemae.gsd``, else its rasters'."""
    gsd = run.scalemae.gsd if run.scalemae.gsd is not None else raster_gsd(run)
    if gsd is None:
        raise ConfigError(f"scalemae.gsd: {run.data.dataset}'s rasters carry no georeferenced transform; give the ground sample distance in metres")
    return gsd


def gsd_scale(run) -> float:
    """ScaleMAE's position scale: the run's GSD over the reference GSD (1 = MAE's table)."""
    return run_gsd(run) / run.scalemae.reference_gsd


def needs_pretraining(run) -> bool:
    return getattr(run, run.method).weights is None


def public_weights_unavailable(run) -> str | None:
    from rsseg.checkpoints.store import imported_fingerprint
    from rsseg.workdir import Workdir

    name = getattr(run, run.method).weights
    if name and imported_fingerprint(Workdir.resolve(), name) is None:
        how = "DIR --format vitmae" if run.method == "mae" else "RELEASE.pth --format scalemae"
        return (f"{run.method}.weights: public weights {name!r} are not imported (`platform weights import {how} "
                f"--name {name}`), so this cell is skipped")
    return None


def mae_tags(run) -> dict[str, object]:
    spec = getattr(run, run.method)
    return {"backbone": f"vit-{spec.size}", "blocks": ",".join(map(str, spec.blocks)),
            "weights": f"public:{spec.weights}" if spec.weights else "pre-trained here"}
