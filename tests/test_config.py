"""Strict configs: YAML + ${ENV} + profiles + --set, and one-line errors naming file and key."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rsseg.cli import app
from rsseg.runspec import load_run, load_sweep, show
from rsseg.config.specs import IterationsSpec
from rsseg.runspec import RunSpec
from rsseg.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_live_in_schema_and_specs_are_frozen():
    spec = RunSpec()
    assert spec.finetune.lr == 2e-4 and spec.finetune.iterations == 300
    assert spec.ddpm.features.timesteps == [50, 100, 150]
    assert spec.pretrain.iterations.counts() == (180_000, 20_000)
    with pytest.raises(Exception, match="frozen"):
        spec.finetune.lr = 1.0


def test_env_interpolation_with_and_without_default(tmp_path, monkeypatch):
    f = write(tmp_path / "run.yaml", "data: {dataset: folder, root: ${MY_ROOT}, class_table: ${TABLE:-paper12}}\n")
    monkeypatch.setenv("MY_ROOT", "/data/x")
    spec = load_run(f).spec
    assert str(spec.data.root) == "/data/x" and spec.data.class_table == "paper12"
    monkeypatch.delenv("MY_ROOT")
    with pytest.raises(ConfigError, match=r"run.yaml: data.root: environment variable \$\{MY_ROOT\} is not set"):
        load_run(f)


def test_unknown_key_names_file_key_and_closest(tmp_path):
    f = write(tmp_path / "run.yaml", "finetune:\n  iteratons: 10\n")
    with pytest.raises(ConfigError, match=r"run.yaml: finetune.iteratons: unknown key; did you mean 'iterations'\?") as e:
        load_run(f)
    assert "\n" not in str(e.value)


def test_wrong_type_names_key_and_expectation(tmp_path):
    f = write(tmp_path / "run.yaml", "finetune: {iterations: lots}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: finetune.iterations: .*integer.*'lots'"):
        load_run(f)


def test_literal_error_lists_choices(tmp_path):
    f = write(tmp_path / "run.yaml", "data: {split_by: random}\n")
    with pytest.raises(ConfigError, match=r"data.split_by: expected 'auto', 'tile' or 'scene', got 'random'"):
        load_run(f)


def test_an_unknown_dataset_lists_the_registered_ones(tmp_path):
    f = write(tmp_path / "run.yaml", "data: {dataset: imagenet}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: data.dataset: unknown dataset 'imagenet'; expected one of folder, gid, minifrance, synthetic$"):
        load_run(f)
    f = write(tmp_path / "run.yaml", "pretrain: {homogeneous_data: {dataset: imagenet}}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: pretrain.homogeneous_data.dataset: unknown dataset 'imagenet'"):
        load_run(f)


def test_set_overrides_are_type_checked_and_named(tmp_path):
    f = write(tmp_path / "run.yaml", "finetune: {iterations: 10}\n")
    spec = load_run(f, overrides=["finetune.iterations=25", "ddpm.features.timesteps=[0, 50]"]).spec
    assert spec.finetune.iterations == 25 and spec.ddpm.features.timesteps == [0, 50]
    with pytest.raises(ConfigError, match=r"--set finetune.iterations: finetune.iterations: .*integer"):
        load_run(f, overrides=["finetune.iterations=abc"])
    with pytest.raises(ConfigError, match=r"--set finetune\.itr: finetune.itr: unknown key; did you mean 'iterations'"):
        load_run(f, overrides=["finetune.itr=3"])
    with pytest.raises(ConfigError, match=r"--set finetune: expected KEY=VALUE"):
        load_run(f, overrides=["finetune"])


def test_profile_merges_and_replace_swaps_a_block(tmp_path):
    sweep = write(
        tmp_path / "sweeps" / "s.yaml",
        "name: s\nbase:\n  data: {dataset: minifrance, root: /data/mf, label_ratio: 0.4}\n  finetune: {iterations: 300, batch_size: 8}\n"
        "space:\n  seed: {grid: [0, 1]}\n",
    )
    write(
        tmp_path / "sweeps" / "profiles" / "tiny.yaml",
        "run:\n  data: !replace {dataset: synthetic, tile_size: 32}\n  finetune: {iterations: 5}\nsweep:\n  search: {max_concurrent: 1}\n",
    )
    loaded = load_sweep(sweep, profile="tiny")
    assert loaded.base.data.dataset == "synthetic" and loaded.base.data.root is None  # replaced, not merged
    assert loaded.base.data.label_ratio == 0.02  # schema default, not the file's
    assert loaded.base.finetune.iterations == 5 and loaded.base.finetune.batch_size == 8  # merged
    assert loaded.spec.search.max_concurrent == 1
    with pytest.raises(ConfigError, match=r"profile .nope. not found \(looked for .*\) \(profiles: .*tiny"):
        load_sweep(sweep, profile="nope")


def test_error_from_profile_names_the_profile(tmp_path):
    run = write(tmp_path / "r.yaml", "finetune: {iterations: 3}\n")
    write(tmp_path / "profiles" / "bad.yaml", "run:\n  finetune: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"profiles/bad.yaml: finetune.lr: input should be greater than 0"):
        load_run(run, profile="bad")


def test_iterations_two_spellings_and_ratio_bounds():
    assert IterationsSpec(total=200, homogeneous_ratio=0.1).counts() == (180, 20)
    assert IterationsSpec(archive=180, homogeneous=20).counts() == (180, 20)
    with pytest.raises(ValueError, match=r"homogeneous_ratio must be within \[0, 1\], got 1.5"):
        IterationsSpec(total=10, homogeneous_ratio=1.5)


def test_config_show_prints_resolved_yaml(tmp_path):
    f = write(tmp_path / "run.yaml", "finetune: {iterations: 7}\n")
    out = show(f, overrides=["seed=3"])
    doc = yaml.safe_load(out)
    assert doc["finetune"]["iterations"] == 7 and doc["seed"] == 3
    assert doc["finetune"]["lr"] == 2e-4  # defaults filled in
    result = CliRunner().invoke(app, ["config", "show", str(f), "--set", "finetune.batch_size=4"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["finetune"]["batch_size"] == 4


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.yaml", "finetune:\n  iterations: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_run(f)


def test_active_config_keeps_only_the_blocks_the_run_uses():
    from rsseg.runspec import RunSpec

    ddpm = RunSpec(method="ddpm").active_config()
    assert "ddpm" in ddpm and "mae" not in ddpm and "gid" not in ddpm["data"] and "synthetic" in ddpm["data"]
    assert "mlp" in ddpm["finetune"] and "upernet" not in ddpm["finetune"] and "runtime" not in ddpm["pretrain"]
    tuned = RunSpec(method="mae", finetune={"frozen": False}, data={"dataset": "gid", "root": "/x"}).active_config()
    assert "ddpm" not in tuned and "mae" in tuned and "gid" in tuned["data"] and "synthetic" not in tuned["data"]
    assert "upernet" in tuned["finetune"] and "mlp" not in tuned["finetune"]
    random = RunSpec(method="convnext_random").active_config()
    assert "pretrain" not in random


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    from rsseg.runspec import load_run

    f = tmp_path / "dup.yaml"
    f.write_text("name: x\nmethod: ddpm\nfinetune:\n  iterations: 10\n  lr: 1.0e-3\n  iterations: 20\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 6: invalid YAML: key 'iterations' is given twice \(first at line 4\)"):
        load_run(f)


def test_a_sweep_names_one_of_the_tables_the_platform_builds(tmp_path):
    from conftest import REPO
    from rsseg.config.specs import PAPER_TABLES
    from rsseg.runspec import load_sweep
    from rsseg.tables.layouts import LAYOUTS

    assert set(PAPER_TABLES) == set(LAYOUTS)  # the schema's vocabulary is the tables' layouts
    f = tmp_path / "s.yaml"
    f.write_text((REPO / "sweeps" / "noise_ablation.yaml").read_text().replace("table: table2", "table: table9"))
    with pytest.raises(ConfigError, match=r"s.yaml: table: unknown table 'table9': expected one of table1, .*fig10 \(or no table\); "
                                          r"did you mean 'table5'\?"):
        load_sweep(f, "smoke")


@pytest.mark.parametrize("data, bands", [
    ({}, 3), ({"dataset": "minifrance"}, 3), ({"dataset": "gid"}, 3), ({"dataset": "gid", "gid": {"image": "nirrgb"}}, 4),
    ({"dataset": "folder"}, None), ({"dataset": "gid", "gid": {"image": "nirrgb"}, "bands": [2, 3, 4]}, 3),
])
def test_the_declared_input_bands_are_one_rule(data, bands):
    """What the planner counts parameters with and the pre-training fingerprint records: None where
    only the rasters say (a folder dataset)."""
    from rsseg.config.specs import DataSpec

    assert DataSpec(**data).declared_bands == bands


@pytest.mark.parametrize("frozen, head", [(True, "mlp"), (False, "upernet")])
def test_the_auto_head_is_resolved_in_one_place(frozen, head):
    """``finetune.head: auto`` is the method's default for frozen features / fine-tuning (MAE: MLP
    on frozen features, UPerNet when fine-tuned); a named head is kept."""
    assert RunSpec(method="mae", finetune={"head": "auto", "frozen": frozen}).head_name == head
    assert RunSpec(method="mae", finetune={"head": "segformer", "frozen": frozen}).head_name == "segformer"
    assert RunSpec(finetune={"head": "auto", "frozen": frozen}).head_name == "mlp"  # DDPM's, either way


@pytest.mark.parametrize("source, dataset, root, expected", [
    ("auto", "synthetic", None, "synthetic"), ("auto", "synthetic", "/arch", "synthetic"),
    ("auto", "folder", "/arch", "folder"), ("auto", "gid", None, "none"),
    ("folder", "synthetic", "/arch", "folder"), ("none", "synthetic", None, "none"), ("synthetic", "gid", None, "synthetic"),
])
def test_the_archive_source_is_resolved_by_one_rule(source, dataset, root, expected):
    """``pretrain.archive.source: auto`` -> synthetic / folder / none in one place (the fingerprint,
    the data checks, the node checks and the archive reader all ask `ArchiveSpec.source_for`)."""
    from rsseg.config.specs import ArchiveSpec, DataSpec

    assert ArchiveSpec(source=source, root=root).source_for(DataSpec(dataset=dataset, root="/data")) == expected
