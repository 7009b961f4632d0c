"""DDPM feature extraction: contract, maps, batched timesteps, early exit, noise, cache."""

import pytest
import torch

from rsseg.cache import CachedEncoder, FeatureCache, cache_key
from rsseg.methods.ddpm.spec import DdpmFeaturesSpec, NoiseScheduleSpec
from rsseg.encoders import check_contract
from rsseg.methods.ddpm.encoder import DdpmEncoder, available_maps
from rsseg.errors import ConfigError
from rsseg.methods.ddpm.unet import build_preset


def encoder(preset="tiny", size=64, **features):
    from rsseg.methods.ddpm.unet import conditioning_of, unet_config

    torch.manual_seed(0)
    unet = build_preset(preset, sample_size=size).eval()
    spec = DdpmFeaturesSpec(**{"resolutions": [16, 8, 4, 2], "timesteps": [0, 50], **features})
    return DdpmEncoder(unet, NoiseScheduleSpec(), spec, weights_id="test", conditioning=conditioning_of(unet_config(preset))).freeze()


@pytest.mark.parametrize("preset, size, side, per_level, channels", [
    ("tiny", 64, "decoder", 3, {16: 128, 8: 64, 4: 64, 2: 32}),
    ("tiny", 64, "encoder", 2, {16: 128, 8: 64, 4: 64, 2: 32}),
    ("ho256", 64, "decoder", 3, {16: 512, 8: 256, 4: 256, 2: 128}),
    ("ho256", 64, "encoder", 2, {16: 512, 8: 256, 4: 256, 2: 128}),
    ("sr3", 32, "decoder", 3, {16: 512, 8: 512, 4: 256, 2: 128}),
    ("sr3", 32, "encoder", 2, {16: 512, 8: 512, 4: 256, 2: 128}),
])
def test_maps_match_feature_info_for_every_preset(preset, size, side, per_level, channels):
    """Random weights, small inputs: shapes and channels are what feature_info declares."""
    enc = encoder(preset, size, side=side, timesteps=[0, 100, 150])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = enc(x)
    check_contract(enc, x, feats)
    assert len(feats) == 3 * 4 * per_level  # timesteps x resolutions x maps per resolution
    assert {fi.stride: fi.channels for fi in enc.feature_info} == channels
    assert len({fi.name for fi in enc.feature_info}) == len(feats)


def test_sr3_decoder_has_the_papers_12_maps():
    with torch.device("meta"):
        unet = build_preset("sr3")
    maps = [m for m in available_maps(unet, "decoder") if m.stride in (16, 8, 4, 2)]
    assert len(maps) == 12 and [m.stride for m in maps] == [16] * 3 + [8] * 3 + [4] * 3 + [2] * 3


def test_explicit_forward_reproduces_diffusers():
    enc = encoder()
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        *_, out = enc.extract(x, t, full=True)
        ref = enc.unet(x, t).sample
    assert torch.equal(out, ref)


@pytest.mark.parametrize("side", ["decoder", "encoder"])
def test_early_exit_features_equal_full_forward_hooks(side):
    enc = encoder(side=side)
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([50, 50])
    captured = {}
    handles = []
    for m in enc.maps:
        blocks = enc.unet.up_blocks if side == "decoder" else enc.unet.down_blocks
        block = blocks[m.block]
        mod = block.attentions[m.layer] if getattr(block, "attentions", None) is not None else block.resnets[m.layer]
        handles.append(mod.register_forward_hook(lambda mod, i, o, key=m.name: captured.__setitem__(key, o)))
    with torch.no_grad():
        enc.unet(x, t)  # the full network, hooks on the real modules
        early = enc.extract(x, t)
    for h in handles:
        h.remove()
    assert len(early) == len(enc.maps)
    for m, f in zip(enc.maps, early):
        assert torch.equal(f, captured[m.name]), m.name


def test_early_exit_skips_the_full_resolution_block():
    """Decoder maps down to 1/2 never run the last (full-resolution) up block."""
    enc = encoder()
    ran = []
    h = enc.unet.up_blocks[-1].register_forward_hook(lambda *a: ran.append(1))
    r = enc.unet.up_blocks[-1].resnets[0].register_forward_hook(lambda *a: ran.append(2))
    with torch.no_grad():
        enc(torch.randn(1, 3, 64, 64))
    h.remove()
    r.remove()
    assert ran == []


def test_batched_timesteps_equal_a_loop_over_timesteps():
    enc = encoder(timesteps=[0, 50, 150])
    x = torch.randn(3, 3, 64, 64)
    keys = ["a", "b", "c"]
    with torch.no_grad():
        batched = enc(x, keys)
        looped = []
        for t in (0, 50, 150):
            single = encoder(timesteps=[t])
            looped.extend(single(x, keys))
    assert len(batched) == len(looped)
    for a, b in zip(batched, looped):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fixed_noise_is_deterministic_per_tile_and_fresh_noise_is_not():
    enc = encoder(timesteps=[100])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = enc(x, ["t1", "t2"])
        b = enc(x[[1, 0]], ["t2", "t1"])  # batch order does not matter, the tile does
        c = enc(x, ["t1", "t3"])
    assert all(torch.equal(fa[0], fb[1]) for fa, fb in zip(a, b))
    assert all(torch.equal(fa[0], fc[0]) for fa, fc in zip(a, c))
    assert not torch.equal(a[0][1], c[0][1])
    fresh = encoder(timesteps=[100], noise="fresh")
    with torch.no_grad():
        f1, f2 = fresh(x, ["t1", "t2"]), fresh(x, ["t1", "t2"])
    assert not torch.equal(f1[0], f2[0])
    # The cache key: none for fresh noise (features differ every call) or trainable weights; for
    # fixed noise it is a function of weights, side and noise seed (not of the timesteps).
    assert fresh.cache_id is None
    assert enc.cache_id == encoder(timesteps=[0, 50]).cache_id
    assert enc.cache_id != encoder(timesteps=[100], noise_seed=1).cache_id
    assert enc.cache_id != encoder(timesteps=[100], side="encoder").cache_id
    unfrozen = DdpmEncoder(enc.unet, NoiseScheduleSpec(), enc.spec, weights_id="test")
    assert unfrozen.cache_id is None


def test_t0_is_the_clean_image():
    enc = encoder(timesteps=[0])
    x = torch.randn(1, 3, 64, 64)
    xt, tt = enc.noised(x, ["a"])
    assert torch.equal(xt, x) and tt.tolist() == [0]
    assert enc.signal_scales[0] == 1.0


def test_unknown_resolution_is_refused():
    with pytest.raises(ConfigError, match=r"ddpm.features.resolutions: 1/32 is not a decoder resolution of this UNet \(available: 1/1, 1/2, 1/4, 1/8, 1/16\)"):
        encoder(resolutions=[32])


def test_cache_hit_equals_recomputation_and_respects_budget(tmp_path):
    enc = encoder(timesteps=[0, 50])
    x = torch.randn(3, 3, 64, 64)
    keys, variants = ["s:0:0", "s:0:64", "s:64:0"], [0, 3, 0]
    cached = CachedEncoder(enc, FeatureCache.open(tmp_path / "c", budget_gb=1))
    first = cached(x, keys, variants)  # misses: 3 tiles x 2 timesteps, computed and stored (one file each)
    assert (cached.cache.stats.misses, cached.cache.stats.computed, cached.cache.stats.writes) == (6, 6, 6)
    assert len(list((tmp_path / "c" / cache_key(enc, "fp32")).rglob("*.npz"))) == 6
    again = CachedEncoder(enc, FeatureCache.open(tmp_path / "c", budget_gb=1))  # another run, same keys
    second = again(x, keys, variants)
    assert again.cache.stats.hits == 6 and again.cache.stats.computed == 0 and again.cache.stats.tiles_computed == 0
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with torch.no_grad():
        direct = enc(x, keys, variants)
    for a, d in zip(second, direct):
        torch.testing.assert_close(a, d, rtol=2e-3, atol=2e-3)  # float16 storage
    # over budget: nothing written, features still returned (computed online)
    tiny = CachedEncoder(enc, FeatureCache.open(tmp_path / "small", budget_gb=1e-9))
    out = tiny(x, keys, variants)
    assert tiny.cache.stats.writes == 0 and tiny.cache.stats.skipped_over_budget > 0
    assert all(torch.equal(a, b) for a, b in zip(out, first))
    assert not list((tmp_path / "small").rglob("*.claim"))  # claims released when nothing could be written


def test_a_tile_computes_only_the_timesteps_it_lacks(tmp_path, monkeypatch):
    """t = 50 cached by one trial, [100, 50] asked by the next: one forward of t = 100 only, and
    the maps equal computing both at once."""
    x = torch.randn(2, 3, 64, 64)
    keys, variants = ["s:0:0", "s:0:64"], [0, 0]
    one = encoder(timesteps=[50])
    CachedEncoder(one, FeatureCache.open(tmp_path / "c", budget_gb=1))(x, keys, variants)
    both = encoder(timesteps=[100, 50])
    assert cache_key(both, "fp32") == cache_key(one, "fp32")  # the features' identity does not include the timestep set
    calls = []
    original = both.forward
    monkeypatch.setattr(both, "forward", lambda *a, **k: calls.append(k.get("parts")) or original(*a, **k))
    cached = CachedEncoder(both, FeatureCache.open(tmp_path / "c", budget_gb=1))
    maps = cached(x, keys, variants)
    assert calls == [["t100"]] and cached.cache.stats.hits == 2 and cached.cache.stats.computed == 2
    with torch.no_grad():
        direct = both.__class__.forward(both, x, keys, variants)
    for a, d in zip(maps, direct):
        torch.testing.assert_close(a, d, rtol=2e-3, atol=2e-3)


def test_a_cached_value_does_not_depend_on_what_else_was_missing_with_it(tmp_path):
    """Two trial orders fill two caches: t = 50 of five tiles in one batch; or [100, 50] of three
    tiles, then of the other two. Every stored (tile, t = 50) file is bit-equal: each forward that
    fills the cache has the same shape (rsseg.cache.FORWARD_TILES tiles of one part)."""
    x = torch.randn(5, 3, 64, 64)
    keys, variants = [f"s:0:{64 * i}" for i in range(5)], [0] * 5
    one = encoder(timesteps=[50])
    CachedEncoder(one, FeatureCache.open(tmp_path / "a", budget_gb=1))(x, keys, variants)
    both = encoder(timesteps=[100, 50])
    other_order = CachedEncoder(both, FeatureCache.open(tmp_path / "b", budget_gb=1))
    other_order(x[:3], keys[:3], variants[:3])
    other_order(x[3:], keys[3:], variants[3:])
    cid = cache_key(one, "fp32")
    for k in keys:
        a = FeatureCache.open(tmp_path / "a", budget_gb=1).get(cid, "t50", k, 0)
        b = FeatureCache.open(tmp_path / "b", budget_gb=1).get(cid, "t50", k, 0)
        assert all(torch.equal(ma, mb) for ma, mb in zip(a, b)), k
    # negative control: the same tiles in forwards of the batch's own shape (5 tiles x 1 timestep;
    # 3 tiles x 2 timesteps) — what filled the cache before — need not agree
    with torch.no_grad():
        five = one(x, keys, variants)
        three = both(x[:3], keys[:3], variants[:3])[len(five):]  # the t = 50 maps, t-major
    if all(torch.equal(f[:3], t) for f, t in zip(five, three)):
        pytest.skip("this CPU's kernels give equal maps at batch sizes 5 and 6: the control shows nothing here")


def test_a_key_claimed_by_another_process_is_waited_for_not_recomputed(tmp_path, monkeypatch):
    import json
    import time

    import rsseg.cache

    enc = encoder(timesteps=[50])
    cache = FeatureCache.open(tmp_path / "c", budget_gb=1)
    claim = cache.path(cache_key(enc, "fp32"), "t50", "s:0:0", 0).with_name("s_0_0~v0.npz.claim")
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # a live claim of another host
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = enc(x, ["s:0:0"], [0], parts=["t50"])

    class OtherProcessFinishesWhileWeWait:  # at the waiter's first poll: provably waiting, no race
        polls = 0

        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            self.polls += 1
            if self.polls == 1:
                cache.put(cache_key(enc, "fp32"), "t50", "s:0:0", 0, [m[0] for m in maps])
                claim.unlink()

    clock = OtherProcessFinishesWhileWeWait()
    monkeypatch.setattr(rsseg.cache, "time", clock)
    waiter = CachedEncoder(enc, FeatureCache.open(tmp_path / "c", budget_gb=1))
    out = waiter(x, ["s:0:0"], [0])
    assert clock.polls == 1 and waiter.cache.stats.computed == 0 and waiter.cache.stats.waited == 1
    monkeypatch.undo()
    assert torch.equal(out[0], maps[0][:1].to(torch.float16).float())
    # a claim whose process is gone (this host) is taken over
    claim.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 2**22 + 12345}))
    cache.path(cache_key(enc, "fp32"), "t50", "s:0:0", 0).unlink()
    again = CachedEncoder(enc, FeatureCache.open(tmp_path / "c", budget_gb=1))
    again(x, ["s:0:0"], [0])
    assert again.cache.stats.computed == 1 and not claim.exists()


def test_a_key_written_between_our_miss_and_our_claim_is_read_not_recomputed(tmp_path, monkeypatch):
    """The race two concurrent trials hit (208 parts computed for 185 files in one CI run): our
    read misses, the other trial writes the key and releases its claim, our claim then succeeds.
    The key is read after the claim, not computed a second time."""
    enc = encoder(timesteps=[50])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = enc(x, ["s:0:0"], [0], parts=["t50"])
    cache = FeatureCache.open(tmp_path / "c", budget_gb=1)
    real_claim = cache.claim

    def claim_after_the_other_trial_finished(cache_id, part, tile, variant):
        if not cache.path(cache_id, part, tile, variant).exists():
            cache.put(cache_id, part, tile, variant, [m[0] for m in maps])  # the other trial: written, released
        return real_claim(cache_id, part, tile, variant)

    monkeypatch.setattr(cache, "claim", claim_after_the_other_trial_finished)
    late = CachedEncoder(enc, cache)
    out = late(x, ["s:0:0"], [0])
    assert late.cache.stats.computed == 0 and late.cache.stats.waited == 1
    assert torch.equal(out[0], maps[0][:1].to(torch.float16).float())
    assert not list((tmp_path / "c").rglob("*.claim"))  # our claim released


def test_noise_differs_by_augmentation_variant_in_the_cache_key(tmp_path):
    enc = encoder(timesteps=[50])
    cache = FeatureCache.open(tmp_path / "c", budget_gb=1)
    cached = CachedEncoder(enc, cache)
    x = torch.randn(1, 3, 64, 64)
    cached(x, ["s:0:0"], [0])
    cached(x, ["s:0:0"], [5])
    assert cache.stats.misses == 2
    assert cache.path(cache_key(enc, "fp32"), "t50", "s:0:0", 5).exists()


def test_a_full_disk_turns_the_cache_off_and_features_are_computed_online(full_disk, tmp_path):
    enc = encoder(timesteps=[0, 50])
    x = torch.randn(2, 3, 64, 64)
    keys, variants = ["s:0:0", "s:0:64"], [0, 0]
    cached = CachedEncoder(enc, FeatureCache.open(full_disk / "cache", budget_gb=1))
    out = cached(x, keys, variants)
    assert cached.cache.writable is False and cached.cache.stats.writes == 0 and cached.cache.stats.computed == 4
    working = CachedEncoder(enc, FeatureCache.open(tmp_path / "ok", budget_gb=1))(x, keys, variants)
    assert all(torch.equal(a, d) for a, d in zip(out, working))  # the features a working cache gives
    assert not [p for p in (full_disk / "cache").rglob("*") if p.is_file()]  # nothing half-written left
    again = cached(x, keys, variants)  # later batches: no more write attempts, same features
    assert all(torch.equal(a, b) for a, b in zip(again, out))


def test_the_cache_key_covers_what_a_stored_array_depends_on(monkeypatch):
    """Each field that changes what a (tile, timestep) file holds changes the key; the timestep set
    does not (each timestep is a part of its own, shared by every run that uses it)."""
    import rsseg.cache

    key = cache_key(encoder(timesteps=[50]), "fp32")
    assert cache_key(encoder(timesteps=[100, 50]), "fp32") == key
    changed = {
        "precision (bf16 on a GPU)": cache_key(encoder(timesteps=[50]), "bf16"),
        "maps": cache_key(encoder(timesteps=[50], maps=[-1]), "fp32"),
        "resolutions": cache_key(encoder(timesteps=[50], resolutions=[16]), "fp32"),
        "side": cache_key(encoder(timesteps=[50], side="encoder"), "fp32"),
        "noise seed": cache_key(encoder(timesteps=[50], noise_seed=1), "fp32"),
    }
    other = encoder(timesteps=[50])
    other.weights_id = "other weights"
    changed["weights"] = cache_key(other, "fp32")
    monkeypatch.setattr(rsseg.cache, "FORWARD_TILES", rsseg.cache.FORWARD_TILES * 2)
    changed["tiles per forward (the kernels' blocking)"] = cache_key(encoder(timesteps=[50]), "fp32")
    monkeypatch.undo()
    monkeypatch.setattr(rsseg.cache, "FEATURE_CODE_VERSION", rsseg.cache.FEATURE_CODE_VERSION + 1)
    changed["feature code version"] = cache_key(encoder(timesteps=[50]), "fp32")
    assert all(k != key for k in changed.values()) and len(set(changed.values())) == len(changed), changed


def test_features_of_other_maps_are_never_served_from_the_cache(workdir):
    """The crash of a run after another that cached other maps of the same weights (all maps,
    then ``maps: [-1]``): the second run computes its own features."""
    from conftest import tiny_run
    from rsseg import finetune

    def run(maps):
        return tiny_run(ddpm={"features": {"weights": "random", "timesteps": [50], "maps": maps}},
                        finetune={"iterations": 2, "eval_every": 2, "augment": {"stretch": False}})

    everything = finetune.run(run(None), workdir)
    last_only = finetune.run(run([-1]), workdir)
    assert everything.cache["cache/parts_computed"] > 0 and last_only.cache["cache/parts_computed"] > 0
    assert last_only.trainable_params < everything.trainable_params


def test_a_stored_array_of_another_shape_is_a_miss_with_a_warning(tmp_path, caplog):
    """Whatever wrote it (an older feature code, a hand-made file): maps that are not what this
    encoder computes are recomputed, never used and never a crash."""
    enc = encoder(timesteps=[50])
    x = torch.randn(1, 3, 64, 64)
    cache = FeatureCache.open(tmp_path / "c", budget_gb=1)
    key = cache_key(enc, "fp32")
    cache.put(key, "t50", "s:0:0", 0, [torch.zeros(5, 4, 4)])  # one map of the wrong shape
    cached = CachedEncoder(enc, cache)
    with caplog.at_level("WARNING", logger="rsseg.cache"):
        maps = cached(x, ["s:0:0"], [0])
    assert cached.cache.stats.hits == 0 and cached.cache.stats.computed == 1
    assert "holds maps [(5, 4, 4)], this encoder computes" in caplog.text
    check_contract(enc, x, maps)


def test_features_read_ddpm_cds_way_first_map_per_level_full_resolution_included():
    """docs/sr3.md's DDPM-CD reading: the first decoder map of each of the 5 levels, 1/1 included."""
    enc = encoder("sr3", 32, maps=[0], resolutions=[16, 8, 4, 2, 1], noise="fresh", timesteps=[50])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = enc(x)
    check_contract(enc, x, feats)
    assert [fi.stride for fi in enc.feature_info] == [16, 8, 4, 2, 1] and all(fi.group.endswith(".0") for fi in enc.feature_info)
    assert enc.cache_id is None  # fresh noise: computed every call


@pytest.mark.parametrize("conditioning, last", [("timestep", 999), ("noise_level", 1000)])
def test_the_timestep_bound_is_one_rule_at_its_boundary(conditioning, last):
    """A feature timestep may name 0..T-1 (diffusers' step index) or 0..T (DDPM-CD's table, 1 at t = 0)."""
    from rsseg.methods.ddpm.noise import ForwardProcess, max_feature_timestep, timesteps_outside
    from rsseg.methods.ddpm.spec import NoiseScheduleSpec

    assert max_feature_timestep(1000, conditioning) == last
    assert ForwardProcess(NoiseScheduleSpec(), conditioning).max_timestep == last
    assert timesteps_outside([0, last], 1000, conditioning) is None
    assert timesteps_outside([0, last + 1], 1000, conditioning) == f"{last + 1} is outside the schedule's 0..{last}"
