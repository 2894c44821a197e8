"""`gopd demo` config resolution: the YAML of a source checkout or the built-in defaults of an installed
package, with `--set key=value` overrides applied in both cases. No model is loaded (run_demo is stubbed)."""

import os

import pytest

from helpers import need  # noqa: E402

yaml = need("yaml")

from gopd import cli  # noqa: E402
from gopd import config as config_mod
from gopd.experiments import demo, stats  # noqa: E402


@pytest.fixture
def captured(monkeypatch):
    """Replaces run_demo with a stub that records the config it was given."""
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg=None: seen.append(cfg))
    return seen


@pytest.fixture
def no_configs_dir(monkeypatch, tmp_path):
    """As in an installed package: there is no configs/demo.yaml next to the code."""
    monkeypatch.setattr(demo, "DEMO_YAML", str(tmp_path / "missing" / "demo.yaml"))


def test_builtin_defaults_equal_configs_demo_yaml():
    assert os.path.exists(demo.DEMO_YAML), "configs/demo.yaml should exist in a source checkout"
    from_yaml = config_mod.to_dict(config_mod.load(demo.DEMO_YAML))
    from_dict = config_mod.to_dict(config_mod.from_dict(demo.DEMO_DEFAULTS))
    assert from_yaml == from_dict


@pytest.mark.parametrize("installed", [False, True])
def test_demo_cli_applies_overrides(request, captured, installed):
    if installed:
        request.getfixturevalue("no_configs_dir")
    assert cli.main(["demo", "--set", "steps=3", "--set", "lam=1.5", "--set", "out_dir=elsewhere"]) == 0
    (cfg,) = captured
    assert (cfg.steps, cfg.lam, cfg.out_dir) == (3, 1.5, "elsewhere")
    # everything not overridden comes from the demo's settings, not from Config's generic defaults
    assert cfg.teacher == demo.DEMO_DEFAULTS["teacher"] != config_mod.Config().teacher
    assert cfg.n_eval == demo.DEMO_DEFAULTS["n_eval"]


def test_demo_without_overrides_uses_demo_settings(captured, no_configs_dir):
    assert cli.main(["demo"]) == 0
    assert config_mod.to_dict(captured[0]) == config_mod.to_dict(config_mod.from_dict(demo.DEMO_DEFAULTS))


def test_demo_explicit_config_file(captured, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("steps: 5\nn_eval: 8\n")
    assert cli.main(["demo", "--config", str(path), "--set", "n_eval=4"]) == 0
    cfg = captured[0]
    assert (cfg.steps, cfg.n_eval) == (5, 4)
    assert cfg.teacher == config_mod.Config().teacher  # the file alone, no demo defaults


def test_demo_unknown_override_is_a_clear_error(captured, no_configs_dir, capsys):
    assert cli.main(["demo", "--set", "stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "'stepz'" in err and "'steps'" in err  # the bad key and the closest valid one
    assert not captured


def test_demo_config_function_directly(no_configs_dir):
    cfg = demo.demo_config(None, ("batch_size=2", "micro_batch_size=2"))
    assert (cfg.batch_size, cfg.micro_batch_size) == (2, 2)
    assert cfg.student == demo.DEMO_DEFAULTS["student"]


def test_confidence_helpers():
    lo, hi = stats.wilson_interval(0.5, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert stats.wilson_interval(0.0, 10)[0] == 0.0 and stats.wilson_interval(1.0, 10)[1] == 1.0
    # p1 - p2 interval: 1.96 * sqrt((.25 + .25) / 128)
    assert abs(stats.diff_half_width(0.5, 0.5, 128) - 1.96 * (0.5 / 128) ** 0.5) < 1e-12


def test_run_demo_end_to_end_on_tiny_models(tmp_path):
    """The real run_demo on tiny models: the table's rows, paired differences, curves of held-out pass@1
    and KL-to-teacher from step 0 for both arms, demo.json and demo.png."""
    import json

    pytest.importorskip("transformers")
    spec = "{tiny: {initializer_range: 0.2}, seed: 0}"
    cfg = demo.demo_config(None, (f"student={spec}", "teacher={tiny: {initializer_range: 0.2}, seed: 0, sharpen: 3}",
                                  "teacher_context=none", "steps=2", "eval_every=2", "n_train=16", "n_eval=4",
                                  "n_eval_kl=4", "max_new_tokens=4", "eval_max_new_tokens=4", "lr=0.01",
                                  "threads=1", "progress=false", f"out_dir={tmp_path}"))
    results = demo.run_demo(cfg)
    assert list(results) == ["student before", "teacher", "after OPD (lam=1)",
                             "after ExOPD (lam=1.25)"]
    out = json.loads((tmp_path / "demo.json").read_text())
    assert out["n_eval"] == 4 and set(out["differences_to_student_before"]) == set(list(results)[1:])
    for arm in ("OPD", "ExOPD"):
        rows = [r for r in out["curves"][arm] if "accuracy" in r]  # the evaluation points
        assert [r["step"] for r in rows] == [0, 2]
        assert all("accuracy" in r and r["kl_to_teacher"] >= 0 for r in rows)
        assert rows[-1]["kl_to_teacher"] < rows[0]["kl_to_teacher"]  # the student moved towards the teacher
    pytest.importorskip("matplotlib")
    assert (tmp_path / "demo.png").exists()
