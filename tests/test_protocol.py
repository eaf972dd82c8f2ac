"""The protocol a sweep file implies (sweep.protocol): what `sweep validate` prints and each run
logs, resolved from the file's settings and the attacks' declarations."""

from __future__ import annotations

from conftest import sweep_cli, tiny_spec_dict

from sweep.data import load_splits
from sweep.protocol import protocol
from sweep.spec import load_spec, parse_spec


def test_digits_protocol_names_the_sizes_the_steps_and_the_precision(tmp_path):
    spec = parse_spec(
        tiny_spec_dict(
            tmp_path,
            grid={"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["pgd", "fgsm_rs"]},
            train_attack={"pgd": {"steps": 2, "step_size": 0.03}},
            refit=True,
        )
    )
    p = protocol(spec)
    s = load_splits("digits")
    assert p["data"] == f"digits: train {len(s.x_train)}, validation {len(s.x_val)}, test " + (
        f"{len(s.x_test)} (carved)"
    )
    assert p["refit"].endswith(f"({len(s.x_train) + len(s.x_val)})")
    assert p["augmentation"] == "random crop, zero padding 1"  # digits: no flips
    # each training attack its own step: pgd's set one, fgsm_rs its paper's 1.25*eps
    assert p["train_attack/pgd"].startswith("2 x 0.03 (set), eps 0.1 linf")
    assert p["train_attack/fgsm_rs"].startswith("1 x 0.125 (1.25*eps)")
    assert p["validation"].startswith("clean + pgd5: 5 x 0.05 (2.5*eps/steps)")
    assert p["test/pgd20"] == "pgd20: 20 x 0.0125 (2.5*eps/steps), eps 0.1 linf"
    assert "momentum 0.9 weight decay 0.0002" in p["student_optim"]
    assert p["precision"].startswith("auto")


def test_validate_prints_the_protocol_of_the_literature_file():
    spec = load_spec("search_spaces/cifar10_robust_kd.yaml")
    out = sweep_cli(".", "validate", "search_spaces/cifar10_robust_kd.yaml")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("protocol:")
    shown = "\n".join(lines[start:])
    for key, value in protocol(spec).items():
        assert f"  {key}" in shown and value in shown
    assert "cifar10: train 45000, validation 5000, the official test split" in shown
    assert "random crop, zero padding 4 + horizontal flip" in shown
    assert "10 x 0.007843" in shown  # 2/255
