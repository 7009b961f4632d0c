"""Feature passes of a sweep's frozen DDPM trials, for ``--dry-run``: what the shared feature
cache computes (each distinct (tile, augmentation variant, timestep) once) against what the same
trials would compute without it (every tile of every batch and evaluation, at every timestep).

A backbone pass = one tile through the network at one timestep. Stretched tiles (augmentation
with a linear stretch) differ from the cached input and are always computed: both counts hold
them. Counting needs the tile index, so it is given when the index is already built (a dry run
writes nothing); ``None`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class PassCount:
    planned: int  # with the cache: distinct cached keys + stretched tiles computed online
    naive: int  # without it
    cached: int  # of planned: the distinct (tile, variant, t) keys the cache computes once
    trials: int  # the trials counted (frozen DDPM features, fixed noise, cache on)


def cached_index(spec, workdir):
    """The tile index of ``spec`` if it is already built, read without writing anything; else None."""
    import polars as pl

    from rsseg.data import registry
    from rsseg.data.tiles import TileIndex, TilingParams, index_key

    from rsseg.data import synthetic

    if not workdir.root.is_dir():
        return None
    if spec.dataset == "synthetic" and not (synthetic.dataset_dir(spec.synthetic, spec.root or workdir.data) / "DONE").exists():
        return None  # not generated yet (and a dry run generates nothing)
    from rsseg.errors import RssegError

    try:
        scenes = registry.scenes(spec, workdir)
    except RssegError:  # data not there (yet): the plan's problems say so
        return None
    params = TilingParams.from_spec(spec, scenes)
    key = index_key(scenes, params)
    path = workdir.indexes / f"{scenes.dataset}-{key}.parquet"
    if not path.is_file():
        return None
    return TileIndex(frame=pl.read_parquet(path), scenes=scenes, params=params, key=key, path=path)


def _counted(run) -> bool:
    f = run.ddpm.features if run.method == "ddpm" else None
    return f is not None and run.finetune.frozen and run.finetune.cache.enabled and f.noise == "fixed"


def trial_keys(run, index):
    """One trial's reads as `rsseg.finetune` makes them: (tile id, variant) of the cached training
    reads, the number of stretched training reads, the val and test tiles (identity variant), and
    the number of evaluation reads."""
    from rsseg.data.dataset import draw_augment
    from rsseg.pretrain import schedule

    ft = run.finetune
    train = index.subset(run.data.label_ratio)["tile_id"].to_list()
    phase = schedule.Phase("finetune", 0, ft.iterations)
    cached, stretched = [], 0
    for it in range(ft.iterations):
        for i, draw in schedule.batch_keys(run.seed, phase, it, len(train), ft.batch_size, 0, 1):
            aug = draw_augment(ft.augment, run.seed, draw)
            if aug.cut is not None:
                stretched += 1
            else:
                cached.append((train[i], aug.variant))
    evals = sum(1 for done in range(1, ft.iterations + 1) if done % ft.eval_every == 0 or done == ft.iterations)
    val, test = evaluated_tiles(run, index)
    return cached, stretched, val, test, evals * len(val) + len(test)


def evaluated_tiles(run, index) -> tuple[list[str], list[str]]:
    """The validation tiles (as fine-tuning picks them) and the test tiles."""
    from rsseg.finetune import validation_tiles

    return validation_tiles(run, index)["tile_id"].to_list(), index.split("test")["tile_id"].to_list()


def count(plan, workdir) -> PassCount | None:

    runs = [t.spec for t in plan.trials]
    runs = [r for r in runs if _counted(r)]
    if not runs:
        return None
    indexes: dict[str, object] = {}
    distinct: dict[tuple, set] = {}
    planned = naive = 0
    for run in runs:
        dkey = run.data.model_dump_json()
        if dkey not in indexes:
            indexes[dkey] = cached_index(run.data, workdir)
        index = indexes[dkey]
        if index is None:
            return None
        cached, stretched, val, test, evaluated = trial_keys(run, index)
        ts = run.ddpm.features.timesteps
        # the cache is shared by the trials of one set of weights, noise and stored maps (rsseg.cache.cache_key)
        f = run.ddpm.features
        group = distinct.setdefault((run.pretrain_fingerprint if run.needs_pretraining else f.weights, f.side, f.noise_seed,
                                     tuple(f.resolutions), tuple(f.maps or ())), set())
        val_test = val + test
        for t in ts:
            group.update((tile, v, t) for tile, v in cached)
            group.update((tile, 0, t) for tile in val_test)
        naive += (len(cached) + stretched + evaluated) * len(ts)
        planned += stretched * len(ts)
    keys = sum(len(g) for g in distinct.values())
    return PassCount(planned + keys, naive, keys, len(runs))


def describe(counted: PassCount | None) -> str:
    if counted is None:
        return ("feature passes: counted once the tile index exists (a first run builds it, or `platform data info`); "
                "the feature cache computes each (tile, variant, timestep) once across the sweep")
    ratio = counted.naive / max(counted.planned, 1)
    return (f"feature passes ({counted.trials} frozen DDPM trials, tiles x timesteps): {counted.planned:,} with the shared "
            f"feature cache vs {counted.naive:,} without ({ratio:.1f}x fewer)")
