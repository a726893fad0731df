"""The results page from runs' summary.json/config.json: grids, the chosen rate, medians over
seeds, the findings' verdicts with the noise rule, the table, the plot."""

import json

import pytest

from loraxs_jax.experiments import report


def _run(root, variant, lr, seed, best, method="loraxs", trainable=384, head=False):
    folder = root / variant / f"lr{lr:g}" / f"seed_{seed}"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "method": method, "task": "sst2", "rank": 4, "init": "svd", "trainable_params": trainable,
        "head_params": 770, "final_accuracy": best - 0.001, "best_accuracy": best,
        "best_step": 300, "steps": 304, "total_seconds": 100.0 + seed}))
    optim = {"lr": 5e-3 if head else lr, "head_lr": lr if head else 5e-3}
    (folder / "config.json").write_text(json.dumps({"method": method, "seed": seed,
                                                    "optim": optim}))


def test_grid_seeds_findings_table_and_plot(tmp_path):
    runs = tmp_path / "runs"
    for lr, acc in ((1e-3, 0.80), (3e-3, 0.84), (1e-2, 0.82)):
        _run(runs, "loraxs_r4", lr, 0, acc)
    for seed, acc in ((1, 0.85), (2, 0.83)):
        _run(runs, "loraxs_r4", 3e-3, seed, acc)
    for seed, acc in ((0, 0.70), (1, 0.71), (2, 0.69)):
        _run(runs, "ablation_init_random", 3e-3, seed, acc)
    for seed, acc in ((0, 0.838), (1, 0.842), (2, 0.84)):
        _run(runs, "ablation_init_svd_bottom", 3e-3, seed, acc)
    for lr, acc in ((1e-3, 0.75), (3e-3, 0.78)):
        _run(runs, "head", lr, 0, acc, method="head", trainable=0, head=True)
    done = report.report(runs, tmp_path / "docs")
    v = done["variants"]["loraxs_r4"]
    assert v.grid == {1e-3: 0.80, 3e-3: 0.84, 1e-2: 0.82} and v.lr == 3e-3
    assert [r.seed for r in v.seeds] == [0, 1, 2] and v.median == 0.84
    assert v.spread == pytest.approx(0.02)
    assert done["variants"]["head"].lr == 3e-3            # head-only runs vary the head's rate
    verdicts = {f["b"]: f["verdict"] for f in done["findings"]}
    assert verdicts == {"ablation_init_random": "reproduced",        # 14 pts > noise
                        "ablation_init_svd_bottom": "within noise"}  # 0 pts
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| loraxs_r4 | loraxs | 4 | svd | 384 | 0.001: 80.00, 0.003: 84.00, 0.01: 82.00 | " \
           "0.003 | 0,1,2 | 84.00 | 2.00 |" in text
    assert "## Ablations" in text and "Table 4: SVD bases beat random bases (r=4): reproduced" in text
    assert (tmp_path / "docs" / "results_accuracy_vs_params.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        report.report(tmp_path / "empty", tmp_path / "x")


def test_a_base_model_joins_as_variant_base(tmp_path):
    runs = tmp_path / "runs"
    for lr, acc in ((1e-3, 0.50), (3e-3, 0.56)):
        _run(runs, "loraxs_r16", lr, 0, acc, trainable=6144)
    (runs / "base").mkdir()
    (runs / "base" / "scores_base.json").write_text(json.dumps({"arc_easy_accuracy": 0.40,
                                                                "accuracy": 0.40}))
    done = report.report(runs, tmp_path / "docs", n_eval=570)
    base = done["variants"]["base"]
    assert base.median == 0.40 and base.summary["trainable_params"] == 0
    assert "| base | base | - | - | 0 | 0: 40.00 | 0 | 0 | 40.00 | 0.00 | 40.00 | 0 | - |" in (
        tmp_path / "docs" / "results.md").read_text()
    (finding,) = done["findings"]
    assert finding["b"] == "base" and finding["verdict"] == "reproduced"   # 16 pts
    assert finding["noise"] == pytest.approx((0.56 * 0.44 / 570 + 0.4 * 0.6 / 570) ** 0.5)
    (runs / "base" / "scores_base.json").write_text(json.dumps({"exact_match": 0.4}))
    with pytest.raises(ValueError, match="has no 'accuracy'"):
        report.report(runs, tmp_path / "docs2")
