"""Bad input is refused by `sweep validate` before any trial starts (issue 19, items 16-21).

The corpus (tests/bad_specs/*.yaml) holds one bad sweep file per kind of mistake; each file's
first line, `# expect: A | B | C`, lists what its message must say (the field, what was given,
what is allowed); a second line `# env: VAR=value` sets the environment it is validated in. Each
file runs in-process through the CLI's `main`, so 50 files cost one interpreter start, and each
check is timed alone; one file runs as the real command, to show its status and output.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from conftest import moto_s3, sweep_cli, tiny_spec_dict

from sweep.cli import main
from sweep.spec import STORAGE_ENV, SpecError, parse_spec

CORPUS = Path(__file__).parent / "bad_specs"
FILES = sorted(CORPUS.glob("*.yaml"))
LIMIT_S = 2.0


def _header(path: Path) -> tuple[list[str], dict[str, str]]:
    """(expected substrings, environment) from the file's comment lines."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    expect = [s.strip() for s in lines[0].removeprefix("# expect:").split(" | ")]
    env = {}
    if len(lines) > 1 and lines[1].startswith("# env:"):
        var, _, value = lines[1].removeprefix("# env:").strip().partition("=")
        env[var] = value
    return expect, env


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code or 0)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No storage override from the calling shell; a fresh directory to run in."""
    for var in STORAGE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_the_corpus_covers_every_kind():
    assert len(FILES) >= 40
    for f in FILES:
        assert f.read_bytes().startswith(b"# expect: "), f.name


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_a_bad_file_is_refused_quickly_with_a_message(path, clean_env, capsys):
    expect, env = _header(path)
    for var, value in env.items():
        clean_env.setenv(var, value)
    start = time.perf_counter()
    status = _run(["validate", str(path)])
    took = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert status == 2, out + err
    assert "Traceback" not in out + err
    assert len(err) < 2000, err[:500]  # one short message, not a dump of the input
    assert took < LIMIT_S, f"{took:.2f} s"
    for s in expect:
        assert s in err, f"{s!r} not in: {err}"


def test_the_real_command_gives_status_2_and_no_traceback(tmp_path):
    r = sweep_cli(tmp_path, "validate", str(CORPUS / "alias_bomb.yaml"), timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stdout + r.stderr
    assert "expands to more than 100,000 values" in r.stderr
    assert len(r.stderr) < 2000


@pytest.mark.parametrize(
    "args", [["--top", "0"], ["--top", "-1"], ["--examples", "0"], ["--examples", "-5"]]
)
def test_evaluate_refuses_a_count_below_one(args, clean_env, capsys):
    assert _run(["evaluate", "some-sweep", *args]) == 2
    err = capsys.readouterr().err
    assert f"{args[0]}: invalid _positive value" not in err  # argparse's default wording
    assert args[0] in err and "allowed: 1 or more" in err


def test_evaluate_refuses_an_unknown_storage_scheme(clean_env, capsys):
    assert _run(["evaluate", "some-sweep", "--storage", "ftp://host/sweeps"]) == 2
    assert "--storage: 'ftp://host/sweeps': unknown filesystem 'ftp'" in capsys.readouterr().err


def test_every_method_declares_the_domain_of_its_hyperparameters():
    """Adding a method is one module: its domain is part of it, and its own defaults fit."""
    from sweep.methods import METHODS

    for name, m in METHODS.items():
        assert set(m.domain) == set(m.space), name
        for k, p in m.space.items():
            assert m.domain[k].check_param(p) is None, (name, k)
        for k, v in m.paper_default.items():
            assert m.domain[k].contains(v), (name, k, v)


@pytest.mark.parametrize("kind", ["tpe", "gp", "random", "nsga2"])
def test_the_largest_seed_allowed_seeds_every_sampler(kind, tmp_path):
    """SEED_MAX is what the sampler's seed derivation (seed * 1000 + cell position) can take;
    one more million is not (numpy's RandomState takes seeds below 2**32)."""
    from sweep.samplers import make_sampler
    from sweep.space import SEED_MAX

    for seed, ok in ((SEED_MAX, True), (SEED_MAX + 1_000_000, False)):
        spec = parse_spec(tiny_spec_dict(tmp_path, seed=0, optuna={"sampler": kind}))
        spec = spec.model_copy(update={"seed": seed})  # past the schema, to show why it refuses
        cells = spec.cells()
        if ok:
            make_sampler(spec, cells[-1], len(cells) - 1)
        else:
            with pytest.raises(ValueError):
                make_sampler(spec, cells[-1], len(cells) - 1)


def test_run_checks_the_stores_before_ray_starts(tmp_path, clean_env):
    import ray

    from sweep.driver import run_sweep

    was_up = ray.is_initialized()
    d = tiny_spec_dict(tmp_path)
    d["storage"]["optuna"] = "postgresql://nohost/optuna"
    with pytest.raises(SpecError, match="storage.optuna: .*cannot resolve host 'nohost'"):
        run_sweep(parse_spec(d))
    assert ray.is_initialized() == was_up
    assert not (tmp_path / "sweeps").exists()  # nothing written


@pytest.fixture
def s3_endpoint(monkeypatch, tmp_path):
    """moto's S3 server on loopback (as tests/test_storage_s3.py) with one bucket."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    with moto_s3(tmp_path / "moto.log", "kdsweep-there") as (env, _client):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        yield env


def test_a_bucket_that_does_not_exist_is_refused(s3_endpoint, tmp_path, clean_env, capsys):
    good = tiny_spec_dict(tmp_path)
    good["storage"].update(path="s3://kdsweep-there/sweeps", optuna="sqlite:///o.db")
    bad = {**good, "storage": {**good["storage"], "path": "s3://kdsweep-nowhere/sweeps"}}
    for name, d in (("good", good), ("bad", bad)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d))
    assert _run(["validate", str(tmp_path / "good.yaml")]) == 0
    start = time.perf_counter()
    assert _run(["validate", str(tmp_path / "bad.yaml")]) == 2
    assert time.perf_counter() - start < LIMIT_S
    err = capsys.readouterr().err
    assert "storage.path: 's3://kdsweep-nowhere/sweeps': bucket 'kdsweep-nowhere' does not " in err
