"""Config loading and the CLI's handling of bad input: one line on stderr, exit code 2."""
import subprocess
import sys

import pytest
import yaml

from pipelines import registry
from pipelines.cli import main
from pipelines.config import load_config, parse_overrides
from pipelines.errors import UserError
from pipelines.sweep import default_space_path, parse_space, sample_configs


def test_overrides_parse_values_as_yaml():
    assert parse_overrides(["a=1", "b=0.5", "c=[1, 2]", "d=true", "e=text", "f.g=3"]) == {
        "a": 1, "b": 0.5, "c": [1, 2], "d": True, "e": "text", "f": {"g": 3}}
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["novalue"])


def test_precedence_defaults_profile_file_sets(tmp_path):
    model = registry.get("data_diet").pipeline().config
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.2, "inits": 3}))
    cfg = load_config(model, path, ["inits=4"], base={"lr": 0.1, "seeds": 2})
    assert (cfg.lr, cfg.inits, cfg.seeds, cfg.retrain_epochs) == (0.2, 4, 2, 40)


@pytest.mark.parametrize("argv, message", [
    (["run", "no_such_method"], "unknown method 'no_such_method'"),
    (["run", "gcond"], "planned, not implemented"),
    (["run", "data_diet", "--set", "bogus=1"], "bogus: unknown key"),
    (["run", "data_diet", "--set", "lr=fast"], "lr: Input should be a valid number"),
    (["run", "data_diet", "--set", "inits=0"], "inits: Input should be greater than or equal to 1"),
    (["run", "data_diet", "--set", "keep_fractions=[1.5]"], "keep fraction 1.5"),
    (["run", "data_diet", "--set", "arms=[best]"], "arms.0"),
    (["sweep", "data_diet", "--samples", "0"], "--samples"),
    (["run", "data_dit"], "unknown method 'data_dit' (did you mean 'data_diet'?)"),
    (["run", "data_diet", "--set", "lrr=0.1"], "lrr: unknown key (did you mean 'lr'?)"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gradworks: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed")
    assert main(["run", "data_diet", "--config", str(bad)]) == 2
    assert "invalid YAML at line 1, column 14 (expected" in capsys.readouterr().err
    assert main(["run", "data_diet", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_out_dir_of_another_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"method": "data_diet", "command": "run", "lr": 9.0}))
    assert main(["run", "data_diet", "--out", str(out)]) == 2
    assert "another config" in capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 9.0


def test_console_script_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "data_diet", "--set", "seed=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "Traceback" not in proc.stderr and "seed" in proc.stderr


def test_list_shows_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    entries = registry.catalogue()
    assert len(entries) == 31
    for method_id in entries:
        assert method_id in out
    assert "data_diet" in out and "implemented" in out and "planned" in out
    assert main(["list", "--by", "taxonomy"]) == 0
    assert "[L2]" in capsys.readouterr().out


def test_catalogue_entries_are_complete():
    for entry in registry.catalogue().values():
        for field in ("title", "family", "goal", "pearl_level", "stage", "data_requirements"):
            assert getattr(entry, field), (entry.id, field)
        assert entry.pearl_level in {"L1", "L2", "L3", "n/a"}


def test_every_implemented_method_has_a_valid_tune_space():
    for entry in registry.catalogue().values():
        if entry.status != "implemented":
            continue
        pipeline = entry.pipeline()
        path = default_space_path(entry.id)
        assert path.exists(), path
        spec = yaml.safe_load(path.read_text())
        space = parse_space(spec, pipeline.config, str(path))
        configs = sample_configs(space, pipeline.config().model_dump(), pipeline.config, 5)
        assert all(isinstance(c, pipeline.config) for c in configs)


def test_space_naming_an_unknown_setting_is_refused(tmp_path):
    model = registry.get("data_diet").pipeline().config
    with pytest.raises(UserError, match="not a setting"):
        parse_space({"params": {"nope": {"choice": [1]}}}, model, "space.yaml")
    with pytest.raises(UserError, match="takes 2 numbers"):
        parse_space({"params": {"lr": {"uniform": [1]}}}, model, "space.yaml")


def test_list_by_taxonomy_labels_the_family(capsys):
    assert main(["list", "--by", "taxonomy"]) == 0
    out = capsys.readouterr().out
    assert "family: adversarial and verification | training / evaluation" in out
    assert "taxonomy:" not in out.split("\n", 1)[1]


def test_show_prints_settings_profiles_space_and_claims(capsys):
    assert main(["show", "data_diet"]) == 0
    out = capsys.readouterr().out
    assert "lr (float) = 0.05  [> 0]" in out and "keep_fractions (list[float]) = [0.7, 0.5, 0.3]" in out
    assert "profile quick" in out and "sweep space" in out and "claims" in out and "deviations" in out
    assert main(["show", "gcond"]) == 2


def test_help_points_to_show_and_has_no_markup(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "gradworks show ID" in out and "``" not in out and "`" not in out


def test_a_submitted_job_needs_an_absolute_out(monkeypatch, capsys):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert main(["run", "data_diet", "--out", "runs/dd"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--out must be an absolute path" in err
