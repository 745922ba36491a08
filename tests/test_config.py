import sys
from pathlib import Path

import helpers
import pytest

from gancore.config import Config, flat, load_config, replace, resume_differences, to_dict
from gancore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr_g=1e-4", "model.nz=64", "train.snapshot_epochs=[1,2]"])
    assert cfg.optim.lr_g == 1e-4 and isinstance(cfg.optim.lr_g, float)
    assert cfg.model.nz == 64
    assert cfg.train.snapshot_epochs == (1, 2)
    assert cfg.optim.lr_d == Config().optim.lr_d  # untouched default


def test_unknown_key_names_key_and_closest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr_gg=1"])
    msg = str(e.value)
    assert "optim.lr_gg" in msg and "optim.lr_g" in msg and "\n" not in msg


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus.key'; sections: data, .*model"):
        load_config(None, ["bogus.key=1"])


@pytest.mark.parametrize("override,fragment", [
    ("optim.lr_g=abc", "optim.lr_g: expected a number"),
    ("model.nz=1.5", "model.nz: expected an integer"),
    ("train.progress=3", "train.progress: expected true/false"),
    ("model.batchnorm=sometimes", "model.batchnorm: 'sometimes' is not one of both, g, d, none"),
    ("optim.lr_g", "is not key=value"),
])
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_bare_no_is_the_string_no(tmp_path):
    """YAML 1.1 reads a bare `no` as False; a choice field whose choices include "no" takes it as "no"."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  mixed_precision: no\n")
    assert load_config(p).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision: expected a string, got True"):
        load_config(None, ["train.mixed_precision=yes"])  # no "yes" among the choices
    with pytest.raises(ConfigError, match="model.arch: expected a string, got False"):
        load_config(None, ["model.arch=no"])  # not a choice field


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lr'"):
        load_config(p)


def test_base_chain_and_name(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  nz: 10\noptim:\n  lr_g: 0.5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim:\n  lr_g: 0.25\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.name, cfg.model.nz, cfg.optim.lr_g) == ("b", 10, 0.25)


def test_flat_excludes_infrastructure():
    f = flat(Config())
    assert f["optim.lr_g"] == 2e-4 and f["model.arch"] == "dcgan_mnist"
    assert "train.log_every" not in f and "data.root" not in f and "track.uri" not in f
    assert "train.log_every" in flat(Config(), include_infra=True)


def test_replace_and_resume_differences():
    cfg = Config()
    other = replace(cfg, **{"optim.lr_g": 1e-3, "train.epochs": 5, "train.log_every": 7})
    assert other.optim.lr_g == 1e-3 and other.train.log_every == 7
    assert resume_differences(to_dict(cfg), other) == ["optim.lr_g: 0.0002 -> 0.001"]


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.name == preset.stem


def test_cli_unknown_key_exits_2_with_one_line():
    r = helpers.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
                     str(ROOT / "configs" / "mnist_dcgan.yaml"), "bogus.key=1"], timeout=120,
                    what="train.py bogus.key=1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bogus.key" in r.stderr


def test_declared_ranges_and_choices_fit_the_defaults():
    """Ranges, choices and registries are declared with each key (gancore/options.py): every default lies inside
    its own range and is one of its own choices, asked of the owner where another module owns the names (config
    never asks an owner about a default, so this is where a default's name is checked)."""
    from gancore.config import choices, declarations

    values = flat(Config(), include_infra=True)
    def leaves(v):
        return [x for item in v for x in leaves(item)] if isinstance(v, (list, tuple)) else [v]

    ranged = {k: f.metadata["range"] for k, f in declarations().items() if "range" in f.metadata}
    for key, rng in ranged.items():
        assert leaves(values[key]), key
        for leaf in leaves(values[key]):
            assert leaf in rng, (key, leaf, rng.describe())
    named = [k for k, f in declarations().items() if "choices" in f.metadata or "registry" in f.metadata]
    assert {"family", "model.arch", "loss.name", "data.name", "eval.extractor", "eval.metrics"} <= set(named)
    for key in named:
        for leaf in leaves(values[key]):
            assert leaf in choices(key), (key, leaf, choices(key))


@pytest.mark.parametrize("override,message", [
    ("optim.batch_size=0", "optim.batch_size=0 is out of range: must be >= 1"),
    ("optim.lr_g=0", "optim.lr_g=0.0 is out of range: must be > 0"),
    ("optim.beta1=1.0", "optim.beta1=1.0 is out of range: must be in [0, 1)"),
    ("loss.label_smoothing=0", "loss.label_smoothing=0.0 is out of range: must be in (0, 1] (1 = off)"),
    ("diffusion.p_uncond=-0.1", "diffusion.p_uncond=-0.1 is out of range: must be in [0, 1]"),
    ("train.ema_decay=1", "train.ema_decay=1.0 is out of range: must be in [0, 1) (0 = no EMA)"),
    ("train.max_steps=-1", "train.max_steps=-1 is out of range: must be >= 0 (0 = as many as train.epochs give)"),
    ("eval.n_samples=-1", "eval.n_samples=-1 is out of range: must be >= 0 (0 = no metrics)"),
    ("train.loss_ranges=[[0,2]]", "train.loss_ranges=[[0, 2]] is out of range: each value must be >= 1"),
    ("optim.lr_g=nan", "optim.lr_g: expected a finite number, got 'nan'"),
    ("eval.metrics=[fid,mse]", "eval.metrics=[fid, mse]: 'mse' is not one of fid, is, kid, pr"),
    ("eval.every=10", "eval.every=10 evaluates nothing while eval.n_samples=0"),
])
def test_out_of_range_is_one_line_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_range_edges_are_accepted():
    cfg = load_config(None, ["optim.beta1=0", "loss.label_smoothing=1", "diffusion.p_uncond=1", "train.max_steps=0",
                             "eval.every=5", "eval.n_samples=100", "train.loss_ranges=[[2,2]]"])
    assert (cfg.optim.beta1, cfg.loss.label_smoothing, cfg.diffusion.p_uncond) == (0.0, 1.0, 1.0)
    assert cfg.train.loss_ranges == ((2, 2),)


def test_replace_checks_ranges_like_from_dict():
    """replace() is what a sweep applies to each sampled value: the same range check."""
    with pytest.raises(ConfigError, match=r"optim.d_iters=0 is out of range"):
        replace(Config(), **{"optim.d_iters": 0})


@pytest.mark.parametrize("sweep", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_file_loads(sweep):
    """The sweep's base is its preset with every override of the file applied (read here from the YAML, keys and
    values), and the objective names what the base evaluates: its extractor and n_samples."""
    import yaml

    from gancore.metrics.extractors import tag
    from gancore.metrics.fidelity import MetricKey
    from gancore.sweep import load_sweep

    raw = yaml.safe_load(sweep.read_text())
    sw = load_sweep(sweep)

    def lists(v):  # YAML lists; the config holds tuples of tuples, flat() lists of tuples
        return [lists(x) for x in v] if isinstance(v, (list, tuple)) else v

    base = flat(sw.base, include_infra=True)
    assert raw["overrides"] and {k: lists(base[k]) for k in raw["overrides"]} == {
        k: lists(v) for k, v in raw["overrides"].items()}
    preset = flat(load_config((sweep.parent / raw["base"]).resolve()), include_infra=True)
    kept = set(base) - set(raw["overrides"]) - {"name"}
    assert {k: base[k] for k in kept} == {k: preset[k] for k in kept}  # nothing else changed
    assert set(base) == set(preset) and sw.base.name == raw["study"]  # the run name is the study's
    key = MetricKey.parse(raw["objective"])
    assert (key.metric, key.extractor, key.count) == ("fid", tag(sw.base.eval.extractor), sw.base.eval.n_samples)
    assert sw.base.eval.n_samples == raw["overrides"]["eval.n_samples"]


def test_every_report_preset_has_its_reports_values():
    """configs/<preset>.yaml against the settings of the report it reproduces (gancore/experiments/reports.py)."""
    from gancore.config import to_dict
    from gancore.experiments.reports import GOAL_SETTINGS, GOALS, REPORT_SETTINGS, REPORTED

    assert set(REPORTED) == set(REPORT_SETTINGS) and set(GOALS) == set(GOAL_SETTINGS)
    assert set(GOALS) == {"mnist_dcgan_plus", "cifar10_sndcgan", "cifar10_cgan_plus"}  # #17's three
    assert [GOALS[p].fid for p in ("mnist_dcgan_plus", "cifar10_sndcgan", "cifar10_cgan_plus")] == [5.0, 15.0, 9.0]
    for preset, want in {**REPORT_SETTINGS, **GOAL_SETTINGS}.items():
        flat = {f"{s}.{k}": v for s, d in to_dict(load_config(ROOT / "configs" / f"{preset}.yaml")).items()
                if isinstance(d, dict) for k, v in d.items()}
        wrong = {k: (flat.get(k), v) for k, v in want.items() if flat.get(k) != v}
        assert not wrong, f"{preset}: (preset, report or goal) {wrong}"
    # the latent ablation is nz 50 and 200 (the report's), no longer 32 and 256
    assert not (ROOT / "configs" / "cifar10_dcgan_nz32.yaml").exists()


def test_runs_are_named_after_their_data(tmp_path):
    """Without a preset a run is named after its data; a preset given a data.path on the command line adds the
    data's name; name= always wins."""
    from gancore.config import load_config

    cats = tmp_path / "My Cats"
    assert load_config(None, []).name == "mnist"
    assert load_config(None, ["data.name=cifar10"]).name == "cifar10"
    assert load_config(None, ["data.name=folder", f"data.path={cats}/"]).name == "My_Cats"
    assert load_config(None, ["data.name=npz", f"data.path={tmp_path / 'faces.npz'}"]).name == "faces"
    assert load_config(ROOT / "configs" / "folder.yaml", [f"data.path={cats}"]).name == "folder-My_Cats"
    assert load_config(ROOT / "configs" / "quickstart.yaml", []).name == "quickstart"
    assert load_config(None, ["name=mine", "data.name=cifar10"]).name == "mine"


@pytest.mark.parametrize("override,start,known", [
    ("model.arch=dcgn", "model.arch: unknown model 'dcgn' (did you mean 'dcgan'?); known: ", "dcgan, dcgan_mnist, denoiser_report"),
    ("loss.name=wgan", "loss.name: unknown loss 'wgan'", "known: hinge, lsgan, nonsaturating"),
    ("family=vea", "family: unknown family 'vea' (did you mean 'vae'?); known: ", "ganomaly, vae"),
    ("eval.extractor=lenet", "eval.extractor: 'lenet' is not one of ",
     "auto, inception, lenet_mnist, lenet_fashion_mnist, cifar_classifier"),
])
def test_names_are_checked_against_their_owner_when_the_config_is_read(override, start, known):
    """A registry-backed key (or eval.extractor, whose names gancore/metrics/extractors.py owns) fails at load time
    with one line listing the known names, not when the run first builds the network or evaluates."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(start) and known in msg and "\n" not in msg


def test_a_bad_config_fails_without_importing_torch():
    """Config and the family sections it composes load without torch, and the checks that need no owner (type,
    range, listed choices, unknown key) fail before any owner is imported."""
    code = ("import sys\nfrom gancore.config import load_config\nfrom gancore.errors import ConfigError\n"
            "for o in ['optim.batch_size=0', 'model.batchnorm=x', 'vae.bta=1', 'diffusion.timesteps=0']:\n"
            "    try:\n        load_config(None, ['model.arch=dcgn', o])\n    except ConfigError as e:\n"
            "        print(str(e).split(' ')[0])\nprint('torch' in sys.modules)\n")
    r = helpers.run([sys.executable, "-c", code], timeout=60, cwd=ROOT, what="loading bad configs without torch")
    assert r.stdout.split() == ["optim.batch_size=0", "model.batchnorm:", "unknown", "diffusion.timesteps=0",
                                "False"], r.stderr
