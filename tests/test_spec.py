"""Bad sweep files are rejected before Ray starts, naming file, field and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweep.spec import SpecError, dump_spec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]


def _grid(**over):
    g = {"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["pgd"]}
    g.update(over)
    return g


def _problems(data):
    with pytest.raises(SpecError) as e:
        parse_spec(data, "bad.yaml")
    return e.value.problems, str(e.value)


@pytest.mark.parametrize(
    "data, field, words",
    [
        (
            {"name": "x", "grid": _grid(method=["kd", "rslad_typo"])},
            "grid.method",
            ["rslad_typo", "allowed: advfunmatch, ard, ataka, cap, ce,"],
        ),
        (
            {"name": "x", "grid": _grid(teacher_loss=["cross"])},
            "grid.teacher_loss[0].name",
            ["cross", "allowed: ce, cmic, label_smoothing, mcmi, mse, pgd_at, trades"],
        ),
        (
            {"name": "x", "grid": _grid(teacher_loss=[{"name": "mcmi", "params": {"lamda": 1}}])},
            "grid.teacher_loss[0].params.lamda",
            ["not a parameter of 'mcmi'", "allowed: centroids, lambda, momentum"],
        ),
        (
            {"name": "x", "grid": _grid(teacher_loss=[{"name": "trades", "params": {"beta": -1}}])},
            "grid.teacher_loss[0].params.beta",
            [">= 0"],
        ),
        (
            {"name": "x", "grid": _grid(teacher_loss=[{"name": "mcmi", "params": {"lambda": []}}])},
            "grid.teacher_loss[0].params.lambda",
            ["an empty list"],
        ),
        (
            {"name": "x", "grid": _grid(teacher_loss=["ce", {"name": "ce"}])},
            "grid.teacher_loss",
            ["names the teacher ce twice"],
        ),
        (
            {
                "name": "x",
                "grid": _grid(),
                "teacher_sets": {"robust": {"loss": "pgd_at", "params": {"beta": 6}}},
            },
            "teacher_sets.robust.params.beta",
            ["not a parameter of 'pgd_at'", "allowed: eps, step_size, steps"],
        ),
        (
            {"name": "x", "grid": _grid(method=["kd", "mtard"])},
            "grid.method",
            ["'mtard' needs two teachers (clean + robust)", "add teacher_sets.robust"],
        ),
        (
            {"name": "x", "grid": _grid(train_attack=["fgsm"]), "threat": {"norm": "l2"}},
            "grid.train_attack",
            ["'fgsm' has no l2 version", "allowed for l2: none, pgd"],
        ),
        (
            {
                "name": "x",
                "grid": _grid(),
                "threat": {"norm": "l2", "eps": 0.5},
                "evaluation": {"attacks": ["pgd20", "mifgsm10"]},
            },
            "evaluation.attacks[1]",
            ["'mifgsm' has no l2 version"],
        ),
        (
            {"name": "x", "grid": _grid(), "teacher_sets": {"ensemble": {"size": 1}}},
            "teacher_sets.ensemble.size",
            ["greater than or equal to 2"],
        ),
        (
            {"name": "x", "grid": _grid(train_attack=["cw"])},
            "grid.train_attack",
            ["cw", "allowed: cw_inf, fgsm, fgsm_rs, mifgsm, none, pgd"],
        ),
        (
            {"name": "x", "grid": _grid(), "dataset": {"name": "imagenet"}},
            "dataset.name",
            ["imagenet", "cifar10"],
        ),
        (
            {"name": "x", "grid": _grid(), "student": {"arch": "vit"}},
            "student.arch",
            ["vit", "resnet18"],
        ),
        (
            {"name": "x", "grid": _grid(), "evaluation": {"attacks": ["pgd20", "deepfool"]}},
            "evaluation.attacks[1].name",
            ["deepfool"],
        ),
        (
            {"name": "x", "grid": _grid(), "threat": {"eps": -0.1}},
            "threat.eps",
            ["greater than or equal to 0"],
        ),
        (
            {"name": "x", "grid": _grid(), "threat": {"eps": 8}},
            "threat.eps",
            ["must be <= 1", "8/255"],
        ),
        (
            {
                "name": "x",
                "grid": _grid(),
                "search_space": {"temperature": {"type": "float", "low": 5, "high": 1}},
            },
            "search_space.temperature",
            ["low (5.0) must not be greater than high (1.0)"],
        ),
        (
            {
                "name": "x",
                "grid": _grid(),
                "search_space": {"lr": {"type": "log_float", "low": 0, "high": 0.1}},
            },
            "search_space.lr",
            ["log range must have low > 0"],
        ),
        (
            {"name": "x", "grid": _grid(), "budget": {"epochs": "ten"}},
            "budget.epochs",
            ["valid integer", "ten"],
        ),
        ({"grid": _grid()}, "name", ["required"]),
        ({"name": "x"}, "grid", ["required"]),
        (
            {"name": "x", "grid": _grid(), "search_space": {"temprature": 4.0}},
            "search_space.temprature",
            ["not a hyperparameter", "temperature"],
        ),
        (
            {"name": "x", "grid": _grid(), "budget": {"trails_per_cell": 3}},
            "budget",
            ["trails_per_cell", "did you mean 'trials_per_cell'"],
        ),
        ({"name": "x", "grid": _grid(method=[])}, "grid.method", ["at least 1 item"]),
        (
            {"name": "x", "grid": _grid(), "objective": {"metric": "test/robust_acc/pgd20"}},
            "objective.metric",
            ["test metric"],
        ),
        (
            {"name": "x", "grid": _grid(method=["ard"], train_attack=["none"])},
            "grid.method",
            ["needs a training attack"],
        ),
        (
            {"name": "x", "grid": _grid(), "method_search_space": {"ard": {"alpha": 0.5}}},
            "method_search_space.ard",
            ["not a method of the grid"],
        ),
        (
            {"name": "x", "grid": _grid(), "budget": {"epochs": 2, "grace_period": 5}},
            "budget",
            ["grace_period (5) must be <= epochs (2)"],
        ),
        (
            {"name": "x", "grid": _grid(), "storage": {"path": "s3://bucket/sweeps"}},
            "storage",
            ["cannot live in an object store", "storage.optuna", "$KDSWEEP_OPTUNA"],
        ),
        (
            {"name": "x", "grid": _grid(), "storage": {"path": "s4://bucket/sweeps"}},
            "storage.path",
            ["unknown filesystem 's4'", "s3://, gs://"],
        ),
        (
            {"name": "x", "grid": _grid(), "repeats": -1},
            "repeats",
            ["greater than or equal to 0"],
        ),
    ],
)
def test_bad_field_is_named_with_what_is_allowed(data, field, words):
    problems, text = _problems(data)
    assert any(f == field for f, _ in problems), problems
    msg = " ".join(m for f, m in problems if f == field)
    for w in words:
        assert w in msg, (w, msg)
    assert text.startswith("bad.yaml: ")


def test_good_file_gets_defaults_and_round_trips(tmp_path):
    spec = load_spec(REPO / "search_spaces" / "quickstart.yaml")
    assert spec.dataset.name == "digits" and spec.budget.trials_per_cell == 3
    again = tmp_path / "again.yaml"
    again.write_text(dump_spec(spec))
    assert load_spec(again) == spec


def test_cells_cover_the_grid_and_teacherless_methods_run_once():
    spec = parse_spec(
        {
            "name": "x",
            "grid": {
                "teacher_loss": ["ce", "mse"],
                "method": ["ce", "kd"],
                "train_attack": ["none", "pgd"],
            },
        }
    )
    keys = sorted(c.key for c in spec.cells())
    assert keys == sorted(
        ["ce.kd.none", "mse.kd.none", "ce.kd.pgd", "mse.kd.pgd", "none.ce.none", "none.ce.pgd"]
    )


def test_space_resolution_defaults_then_global_then_per_method():
    spec = parse_spec(
        {
            "name": "x",
            "grid": _grid(method=["kd", "ard"]),
            "search_space": {
                "temperature": 4.0,
                "lr": {"type": "log_float", "low": 0.01, "high": 0.1},
            },
            "method_search_space": {"ard": {"alpha": 0.9}},
        }
    )
    kd, ard = spec.cell_space("kd"), spec.cell_space("ard")
    assert kd["temperature"] == 4.0 and ard["temperature"] == 4.0
    assert ard["alpha"] == 0.9 and kd["alpha"].low == 0.1  # kd keeps the method's default range
    assert kd["lr"].low == 0.01


# --- through the CLI: exit status 2, no traceback, Ray never imported -------------------------
def _cli(*args, cwd):
    code = (
        "import sys; from sweep.cli import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(
    "content, expected",
    [
        (
            "name: x\ngrid: {teacher_loss: [ce], method: [kdd], train_attack: [pgd]}\n",
            "grid.method: unknown method 'kdd'",
        ),
        (
            "name: x\ngrid: {teacher_loss: [ce], method: [kd], train_attack: [pgd]\n",
            "YAML does not parse: line",
        ),
        (
            "name: x\ngrid: {teacher_loss: [ce], method: [kd], train_attack: [pgd]}\nsearch_space: {temprature: 3}\n",
            "search_space.temprature",
        ),
        (  # a method that needs two teachers, in a file that defines one
            "name: x\ngrid: {teacher_loss: [ce], method: [mtard], train_attack: [pgd]}\n",
            "grid.method: 'mtard' needs two teachers (clean + robust)",
        ),
        (None, "no such file"),
    ],
)
def test_cli_rejects_bad_file_with_status_2_before_ray(tmp_path, command, content, expected):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    r = _cli(command, str(path), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr
    assert str(path) in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "sweeps").exists()


def test_validate_prints_the_plan(tmp_path):
    r = _cli("validate", str(REPO / "search_spaces" / "quickstart.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 cells x 3 trials = 12 trials" in r.stdout
    for key in ("ce.kd.pgd", "mse.kd.pgd", "ce.ard.pgd", "mse.ard.pgd"):
        assert key in r.stdout


def test_every_shipped_sweep_file_is_valid():
    files = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert files
    for f in files:
        load_spec(f)
        yaml.safe_load(f.read_text())


def test_list_json_shows_every_registry_with_method_details(tmp_path):
    import json

    r = _cli("list", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    from sweep.methods import METHODS

    methods = listing["methods"]
    assert set(methods) == set(METHODS.names())
    for name in ("pgd_at", "trades", "kd", "dkd", "ard", "iad", "rslad", "advfunmatch", "mtard"):
        assert name in methods
    for name, info in methods.items():
        assert {"teachers", "inner_max", "space", "needs_attack", "features"} <= set(info), name
    assert methods["ard"]["teachers"] == "one" and methods["ard"]["needs_attack"]
    assert methods["mtard"]["teachers"] == "clean+robust"
    assert methods["ataka"]["teachers"] == "ensemble"
    assert methods["rslad"]["space"]["adv_weight"] == "[0.5, 0.95]"
    assert "KL" in methods["rslad"]["inner_max"]
    assert listing["methods"]["kd"]["space"]["temperature"] == "[1, 10]"
    losses = listing["teacher_losses"]
    assert set(losses) == {"ce", "mse", "label_smoothing", "mcmi", "cmic", "pgd_at", "trades"}
    assert losses["trades"]["params"]["beta"]["default"] == 6.0 and losses["trades"]["adversarial"]
    assert losses["mcmi"]["params"]["lambda"]["low"] == 0
    assert losses["label_smoothing"]["params"]["smoothing"]["default"] == 0.1
    assert losses["pgd_at"]["params"]["eps"]["default"] is None  # = the sweep's threat eps
    r = _cli("list", cwd=tmp_path)  # the human form shows each parameter with its default
    assert r.returncode == 0, r.stderr
    assert "beta=6" in r.stdout and "smoothing=0.1" in r.stdout and "eps=threat.eps" in r.stdout
    assert {"digits", "mnist", "cifar10", "cifar100", "svhn"} <= set(listing["datasets"])
    assert {"none", "fgsm", "pgd"} <= set(listing["attacks"])
    assert {"small_cnn", "resnet18"} <= set(listing["models"])


def test_storage_locations_from_the_environment_override_the_file(tmp_path, monkeypatch):
    """How a cluster points every node at shared storage (cluster/README.md)."""
    from conftest import tiny_spec_dict

    from sweep.spec import STORAGE_ENV

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    for var in STORAGE_ENV:
        monkeypatch.delenv(var, raising=False)
    plain = load_spec(path)
    assert plain.storage.path == str(tmp_path / "sweeps") and plain.storage.optuna is None
    monkeypatch.setenv("KDSWEEP_STORAGE", "/mnt/nfs/sweeps")
    monkeypatch.setenv("KDSWEEP_TEACHERS", "s3://bucket/teachers")
    monkeypatch.setenv("KDSWEEP_OPTUNA", "postgresql+psycopg2://kd@db/optuna")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    s = load_spec(path)
    assert s.storage.path == "/mnt/nfs/sweeps"
    assert s.storage.teachers == "s3://bucket/teachers"
    assert s.storage.optuna == "postgresql+psycopg2://kd@db/optuna"
    assert s.storage.mlflow_tracking_uri == "http://mlflow.internal:5000"


def test_ce_with_an_attack_is_pgd_at_with_it_and_runs_once(tmp_path):
    import torch
    from conftest import tiny_spec_dict

    from sweep.methods import METHODS

    data = tiny_spec_dict(
        tmp_path,
        grid={"teacher_loss": ["ce"], "method": ["ce", "pgd_at"], "train_attack": ["none", "pgd"]},
        search_space={},
    )
    spec = parse_spec(data)
    assert [c.key for c in spec.cells()] == ["none.ce.none", "none.pgd_at.pgd"]
    ((dropped, kept),) = spec.same_cells()
    assert (dropped.key, kept.key) == ("none.ce.pgd", "none.pgd_at.pgd")
    # the reason: the same loss on the same x' (and the same inner objective)
    net = torch.nn.Linear(4, 3)
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    ce, at = METHODS.get("ce")({}), METHODS.get("pgd_at")({})
    assert torch.equal(ce.loss(net, [], x, x, y), at.loss(net, [], x, x, y))
    assert torch.equal(
        ce.inner_objective(net, [], x, y)(net(x)), at.inner_objective(net, [], x, y)(net(x))
    )
    # only one of them in the grid: nothing is dropped
    alone = parse_spec({**data, "grid": {**data["grid"], "method": ["ce"]}})
    assert "none.ce.pgd" in [c.key for c in alone.cells()] and not alone.same_cells()


def test_optimiser_defaults_are_the_literatures():
    from sweep.spec import OptimSpec

    assert OptimSpec().weight_decay == 2e-4 and OptimSpec().momentum == 0.9


def test_a_training_attack_that_resolves_to_another_of_the_grid_runs_once(tmp_path):
    """cw_inf as a *training* attack climbs the method's objective, so with PGD's steps and step
    it is pgd: its cells are run once, under pgd; given its own steps it is a cell of its own."""
    from conftest import tiny_spec_dict

    grid = {"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["pgd", "cw_inf"]}
    same = parse_spec(tiny_spec_dict(tmp_path, grid=grid, train_attack={}))
    assert [c.key for c in same.cells()] == ["ce.kd.pgd"]
    assert [(d.key, k.key) for d, k in same.same_cells()] == [("ce.kd.cw_inf", "ce.kd.pgd")]
    own = parse_spec(tiny_spec_dict(tmp_path, grid=grid, train_attack={"cw_inf": {"steps": 20}}))
    assert [c.key for c in own.cells()] == ["ce.kd.pgd", "ce.kd.cw_inf"] and not own.same_cells()


def test_exponent_floats_in_a_sweep_file_are_numbers(tmp_path):
    """`lr: 1e-3` is a number (YAML 1.2; PyYAML's 1.1 reads it as a string, which the strict
    spec would refuse), and so are `5e-4` and `1.0e30`; text stays text."""
    from sweep.spec import read_yaml

    got = read_yaml(b"a: 1e-3\nb: 5e-4\nc: 1.0e30\nd: 3\ne: 1e\nf: abc\n", "x.yaml")
    assert got == {"a": 0.001, "b": 0.0005, "c": 1e30, "d": 3, "e": "1e", "f": "abc"}
    assert isinstance(got["d"], int)
    d = yaml.safe_load(Path("search_spaces/quickstart.yaml").read_text())
    d["student"].setdefault("optim", {})["lr"] = "LR"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(d).replace("lr: LR", "lr: 1e-3"))
    assert load_spec(path).student.optim.lr == 0.001
