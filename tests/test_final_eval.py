"""`sweep evaluate`: finalists chosen by validation, evaluated on the whole test set, resumable."""

from __future__ import annotations

from conftest import make_context, runs_of, trial_config

from sweep.final_eval import best_runs, evaluate_finalists
from sweep.spec import AttackRun
from sweep.trial import run_trial


def test_best_trial_per_cell_gets_the_full_suite_once(tmp_path):
    ctx = make_context(tmp_path)
    for seed in (0, 1):
        run_trial(ctx, trial_config(seed=seed, number=seed), lambda m, s: None)
    tracker, spec = ctx.tracker(), ctx.spec
    (best,) = best_runs(tracker, spec, top=1)["ce.kd.pgd"]
    runs = runs_of(ctx)
    assert best.data.metrics["val/robust_acc"] == max(
        r.data.metrics["val/robust_acc"] for r in runs
    )  # chosen by the validation objective
    done = evaluate_finalists(tracker, spec, top=1, attacks=[AttackRun.model_validate("pgd5")])
    assert [rid for rid, _ in done] == [best.info.run_id]
    run = tracker.client.get_run(best.info.run_id)
    assert run.data.tags["final_eval"] == "done"
    assert int(run.data.tags["final_examples"]) > spec.evaluation.test_examples  # whole split
    assert {"final/clean_acc", "final/robust_acc/pgd5"} <= set(run.data.metrics)
    assert run.data.metrics["final/robust_acc/pgd5"] <= run.data.metrics["final/clean_acc"]
    # resumable: evaluated runs are skipped, the next-best is evaluated with top=2
    assert evaluate_finalists(tracker, spec, top=1) == []
    again = evaluate_finalists(tracker, spec, top=2, attacks=[AttackRun.model_validate("pgd5")])
    assert len(again) == 1 and again[0][0] != best.info.run_id
