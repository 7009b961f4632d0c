"""What a DDPM run needs from its spec, before any network exists: the UNet it trains or reads,
its MLflow tags, the checks across blocks, whether it needs the platform's pre-training and
whether imported weights it names are there. The method's hooks (`rsseg.methods.ddpm.METHOD`)."""

from __future__ import annotations


def tags(run) -> dict[str, object]:
    f = run.ddpm.features
    return {
        "timesteps": ",".join(str(t) for t in f.timesteps),
        "side": f.side,
        "resolutions": ",".join(str(r) for r in f.resolutions),
        "unet": network_name(run),  # the preset, or "imported NAME" when the network is the imported weights
        "noise": f.noise,
        # what the timestep numbers mean under this run's schedule (Table 2's footer shows it)
        "sqrt_abar": ",".join(f"{t}={s:.4f}" for t, s in signal_scales(run).items()),
        "weights": f.weights,
        "pretrain_init": run.pretrain.init or "",
    }


def network(run, in_channels: int | None = None, sample_size: int | None = None) -> dict:
    """The UNet config a run trains or reads: the imported weights' own network when the run's
    features (``ddpm.features.weights``) or its starting point (``pretrain.init``) name imported
    weights — their width, levels, embedding and GroupNorm groups, as imported (DDPM-CD's release
    is 128 wide, the ``sr3`` preset 64) — else ``ddpm.unet``'s preset with its overrides.
    ``in_channels``: the data's bands (checked against the imported network's; default 3)."""
    from rsseg.errors import ConfigError
    from rsseg.methods.ddpm.unet import unet_config
    from rsseg.checkpoints.store import imported_objective
    from rsseg.workdir import Workdir

    size = sample_size or run.data.tile_size
    name = run.ddpm.features.imported or run.pretrain.init
    objective = imported_objective(Workdir.resolve(), name) if name else None
    if objective is None:
        return unet_config(run.ddpm.unet.preset, run.ddpm.unet.overrides, in_channels=in_channels or 3, sample_size=size)
    theirs = objective["unet"]["in_channels"]
    if in_channels is not None and in_channels != theirs:
        key = "ddpm.features.weights" if run.ddpm.features.imported else "pretrain.init"
        raise ConfigError(f"{key}: the imported weights {name!r} take {theirs} bands, this run's data has {in_channels} "
                          "(data.bands selects which)")
    return {**objective["unet"], "sample_size": size}


def network_name(run) -> str:
    """The preset, or the imported weights whose network the run uses."""
    name = run.ddpm.features.imported or run.pretrain.init
    return f"imported {name}" if name else run.ddpm.unet.preset


def signal_scales(run) -> dict[int, float]:
    """sqrt(abar_t) of the run's feature timesteps under its schedule and conditioning."""
    from rsseg.methods.ddpm.noise import ForwardProcess
    from rsseg.methods.ddpm.unet import conditioning_of

    process = ForwardProcess(run.ddpm.schedule, conditioning_of(network(run)))
    return {t: process.signal(t) for t in run.ddpm.features.timesteps}


def checks(run) -> list[tuple[str, str]]:
    problems = []
    warmup, total = run.ddpm.optim.warmup_iterations, run.pretrain.iterations.n_total
    if warmup > total:
        problems.append(("ddpm.optim.warmup_iterations",
                         f"warm-up of {warmup} iterations is longer than the whole pre-training ({total} iterations, pretrain.iterations)"))
    outside = timesteps_outside(run)
    if outside:
        problems.append(("ddpm.features.timesteps", f"timestep {outside}"))
    return problems + network_checks(run)


def network_checks(run) -> list[tuple[str, str]]:
    """What the UNet can take and give, from its config alone (no network is built): the tile size
    must survive its L-1 halvings, the feature resolutions and map indexes must exist."""
    from rsseg.methods.ddpm.unet import levels, min_input_multiple

    cfg = network(run)
    problems = []
    m, tile, preset = min_input_multiple(cfg), run.data.tile_size, network_name(run)
    if tile % m:
        lower, upper = max(m, tile // m * m), (tile // m + 1) * m
        problems.append(("data.tile_size", f"{tile} is not a multiple of {m}: the {preset} UNet halves its input {levels(cfg) - 1} "
                                           f"times and its skip connections must line up (use {lower} or {upper})"))
    f = run.ddpm.features
    strides = [2**k for k in range(levels(cfg))]
    bad = [r for r in f.resolutions if r not in strides]
    if bad:
        problems.append(("ddpm.features.resolutions", f"1/{bad[0]} is not a {f.side} resolution of the {preset} UNet "
                                                      f"(available: {', '.join('1/' + str(s) for s in strides)})"))
    per_level = cfg["layers_per_block"] + (1 if f.side == "decoder" else 0)
    if f.maps is not None and (wrong := [k for k in f.maps if not -per_level <= k < per_level]):
        problems.append(("ddpm.features.maps", f"map {wrong[0]} does not exist: the {preset} UNet has {per_level} {f.side} maps per "
                                               f"resolution (indexes {-per_level}..{per_level - 1})"))
    return problems


def timesteps_outside(run, timesteps=None) -> str | None:
    """The run's feature timesteps (or ``timesteps``) against its schedule and its UNet's conditioning
    (`noise.timesteps_outside`): the reason they do not fit, or None."""
    from rsseg.methods.ddpm.noise import timesteps_outside as outside
    from rsseg.methods.ddpm.unet import conditioning_of

    ts = run.ddpm.features.timesteps if timesteps is None else timesteps
    return outside(ts, run.ddpm.schedule.train_steps, conditioning_of(network(run)))


def preflight(run) -> list[tuple[str, str]]:
    """Before a sweep starts: frozen features from imported weights are read under the schedule
    they were imported with (timestep numbers mean its noise levels). A pre-training that starts
    from imported weights (``pretrain.init``) trains their network on the run's own schedule."""
    from rsseg.methods.ddpm.noise import schedules_match
    from rsseg.checkpoints.store import imported_objective
    from rsseg.workdir import Workdir

    name = run.ddpm.features.imported
    theirs = imported_objective(Workdir.resolve(), name) if name else None
    if theirs is not None and not schedules_match(theirs["schedule"], run.ddpm.schedule):
        return [("ddpm.features.weights", f"the imported weights {name!r} are read under another schedule ({theirs['schedule']}); "
                                          "set ddpm.schedule to it (e.g. ddpm.schedule.preset: ddpm_cd)")]
    return []


def needs_pretraining(run) -> bool:
    """ema / raw features come from this run's pre-training; random and imported weights need none."""
    return run.ddpm.features.weights in ("ema", "raw")


def unavailable(run) -> str | None:
    """Imported weights named by the run but not in the store: its cells are skipped (with how to
    import them) rather than failing the whole sweep."""
    from rsseg.checkpoints.store import imported_fingerprint
    from rsseg.workdir import Workdir

    for key, name in (("ddpm.features.weights", run.ddpm.features.imported), ("pretrain.init", run.pretrain.init)):
        if name and imported_fingerprint(Workdir.resolve(), name) is None:
            return (f"{key}: weights {name!r} are not imported (`platform weights import PATH --format ddpm-cd --name {name}`), "
                    "so its cells are skipped")
    return None
