"""The architecture contract (pyproject.toml, [tool.importlinter]; DESIGN §2): the science
modules import no Ray, MLflow, Optuna nor orchestration module; the orchestration imports
downward only; Ray is imported by the driver and the search only, MLflow by the tracker only.
`lint-imports` checks it in the test command; here it is run as a user runs it, and shown to
break on a copy of the package (the real tree is never touched)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` in `cwd`, on the `sweep` package found there (it puts its working
    directory first on the import path; PYTHONPATH says the same); no cache written."""
    script = Path(sys.executable).with_name("lint-imports")
    command = str(script) if script.exists() else shutil.which("lint-imports") or "lint-imports"
    return subprocess.run(
        [command, "--no-logo", "--no-cache"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(cwd)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_test_command_checks_the_contract_and_ci_runs_the_readmes_command():
    readme = (REPO / "README.md").read_text().split("## Tests", 1)[1]
    (command,) = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[:1]
    assert "&& lint-imports && python -m pytest" in command
    (ci,) = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in ln]
    assert ci.replace("pip install -q ", "pip install ") == command  # quieter, the same


def test_the_package_keeps_its_import_contracts():
    r = _lint_imports(REPO)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "Contracts: 4 kept, 0 broken." in r.stdout


SCIENCE = "Science is plain PyTorch: no Ray, MLflow, Optuna, nor any orchestration module"


@pytest.mark.parametrize(
    "module, line, broken, says",
    [
        (  # a science module that imports Ray
            "losses.py",
            "import ray",
            [SCIENCE, "Ray lives in the driver and the search only"],
            ["sweep.losses is not allowed to import ray", "sweep.losses -> ray"],
        ),
        (  # the layout (a lower layer) importing the driver (a higher one)
            "layout.py",
            "from . import driver",
            ["Orchestration imports downward only", "Ray lives in the driver and the search only"],
            ["sweep.layout is not allowed to import sweep.driver", "sweep.layout -> sweep.driver"],
        ),
        (  # a reader going to MLflow past the tracker
            "status.py",
            "import mlflow",
            ["The tracker is the only door to MLflow"],
            ["sweep.status -> mlflow"],
        ),
    ],
    ids=["science-imports-ray", "layout-imports-driver", "reader-imports-mlflow"],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, line, broken, says):
    """One added import in a copy of the package breaks the contracts it violates, and only
    those, naming the importing module and what it imports."""
    shutil.copytree(
        REPO / "sweep", tmp_path / "sweep", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "sweep" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402, F401\n")
    r = _lint_imports(tmp_path)
    assert r.returncode == 1, r.stdout[-5000:] + r.stderr[-3000:]
    for contract in broken:
        assert f"{contract} BROKEN" in r.stdout, r.stdout[-5000:]
    assert f"Contracts: {4 - len(broken)} kept, {len(broken)} broken." in r.stdout, r.stdout[-5000:]
    for text in says:
        assert text in r.stdout, r.stdout[-5000:]
