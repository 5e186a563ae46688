"""The ablation benchmark: its scoring (fast UF1, paired bootstrap, nested combination) and an
end-to-end run on a tiny streamed set, with resume."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from mer.ablation import bootstrap_ci, bootstrap_diff, combine_nested, select_rows
from mer.metrics import uf1


def test_bootstrap_of_identical_predictions_is_zero_and_of_better_ones_positive():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    noisy = np.where(rng.random(300) < 0.5, y, rng.integers(0, 4, 300))
    better = np.where(rng.random(300) < 0.8, y, rng.integers(0, 4, 300))
    assert bootstrap_diff(y, noisy, noisy, 4, 200) == (0.0, 0.0, 0.0)
    d, lo, hi = bootstrap_diff(y, better, noisy, 4, 500)
    assert d == pytest.approx(uf1(y, better, 4) - uf1(y, noisy, 4)) and 0 < lo < d < hi
    lo, hi = bootstrap_ci(y, noisy, 4, 500)
    assert lo < uf1(y, noisy, 4) < hi and hi - lo < 0.2


def test_nested_combination_never_looks_at_the_scored_fold():
    """A planted leak: relabel one fold (all class 0); that fold's combined scores must not change,
    while the other folds' do (their weights and biases were tuned on it)."""
    rng = np.random.default_rng(2)
    n, k = 400, 5
    y = rng.integers(0, k, n)
    folds = np.repeat(np.arange(5), n // 5)
    a = rng.dirichlet(np.ones(k), n) + 0.8 * np.eye(k)[y]
    b = rng.dirichlet(np.ones(k), n) + 0.3 * np.eye(k)[y]
    a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    out = combine_nested([a, b], y, folds, "nested", True)
    y2 = y.copy()
    y2[folds == 0] = 0
    out2 = combine_nested([a, b], y2, folds, "nested", True)
    np.testing.assert_array_equal(out[folds == 0], out2[folds == 0])
    assert not np.array_equal(out[folds != 0], out2[folds != 0])


def test_rows_bring_what_they_need():
    names = [r.name for r in select_rows(["ens_apex_nested"])]
    assert names == ["default", "apex_cnn", "ens_apex_nested"]
    # a baseline that combines other rows brings those too
    names = [r.name for r in select_rows(["blink_interp_bias"])]
    assert names == ["default", "bias_nested", "blink_interp", "blink_interp_bias"]
    with pytest.raises(ValueError, match="unknown row.*groups: core, all"):
        select_rows(["no_such_row"])
    # the default is the core table: every choice the yardstick ranks, and what those rows need
    core = [r.name for r in select_rows(None)]
    assert core == [r.name for r in select_rows(["core"])]
    for name in ("default", "flow_dis", "flow_size_128", "flow_size_256", "head_nose", "top_frac_0.1", "channels_uv",
                 "channels_uv_mag", "grid_10ms", "grid_40ms", "apex_cnn", "seeds_1", "ens_apex_nested", "bias_nested"):
        assert name in core
    assert "pretrain" not in core and "pretrain" in [r.name for r in select_rows(["all"])]
    assert [r.name for r in select_rows(["all", "pretrain"])] == [r.name for r in select_rows(["all"])]


def test_ablation_end_to_end_streams_trains_scores_and_resumes(tmp_path, capsys):
    from mer.bench import main

    args = ["ablate", "--work", str(tmp_path / "abl"), "--clips", "21", "--subjects", "7",
            "--rows", "channels_uv", "seeds_1", "tta_mirror", "extra_database", "--seeds", "0", "1",
            "--workers", "2", "--jobs", "1",
            "--bootstrap", "50", "--synth-set", "width=320", "--synth-set", "height=240",
            "--synth-set", "me_ms=[250,300]", "--synth-set", "neutral_ms=[40,60]", "--synth-set", "fps=[200]",
            "--extra-synth-set", "width=320", "--extra-synth-set", "height=240", "--extra-synth-set", "face_width=115",
            "--folds", "3", "--set", "train.epochs=2", "--set", "train.min_steps=1", "--set", "model.sequence.depth=1",
            "--set", "model.sequence.dim=16", "--set", "model.sequence.heads=2"]
    main(args)
    table = capsys.readouterr().out
    for row in ("default", "channels_uv", "seeds_1", "tta_mirror", "extra_database"):
        assert f"| {row} |" in table
    assert "UF1 with / without blinks" in table and "3-fold subject-independent" in table
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    rows = {r["row"]: r for r in result["table"]}
    assert result["n_clips"] == 21 and result["seeds"] == [0, 1]
    assert result["extra_synth"]["width"] == 320 and result["extra_synth"]["fps"] == [30]  # as asked, the rest derived
    assert rows["default"]["seeds"] == 2 and 0 <= rows["default"]["uf1_ens"] <= 1
    assert rows["channels_uv"]["d_lo"] <= rows["channels_uv"]["d_uf1"] <= rows["channels_uv"]["d_hi"]
    assert 0 < result["au_ceiling_uf1"] <= 1
    caches = sorted((tmp_path / "abl" / "cache").glob("*/*/train/clips"))
    # one cache for the main set (rows differ in training only) and one for the extra database
    assert len(caches) == 2 and sorted(len(list(c.glob("*.npz"))) for c in caches) == [10, 21]
    models = sorted((tmp_path / "abl" / "runs").glob("*/fold*/seed*/model.pt"))
    assert len(models) == 3 * 3 * 2  # 3 trained rows (default, channels_uv, extra_database) x 3 folds x 2 seeds
    # the mirror row rescored the default's own models: same folds, other logits
    a = pd.read_csv(tmp_path / "abl" / "runs" / "default" / "fold0" / "seed0" / "oof.csv")
    b = pd.read_csv(tmp_path / "abl" / "runs" / "tta_mirror" / "fold0" / "seed0" / "oof.csv")
    assert list(a["sample"]) == list(b["sample"]) and not np.allclose(a["logit_0"], b["logit_0"])
    extra = json.loads((tmp_path / "abl" / "runs" / "extra_database" / "run.json").read_text())["extra"]
    assert extra and extra[0]["clips"] == 10  # declared, training side only
    oof = pd.concat(pd.read_csv(f) for f in (tmp_path / "abl" / "runs" / "extra_database").glob("fold*/seed0/oof.csv"))
    assert sorted(oof["sample"]) == sorted(a["sample"].tolist() + [s for f in (tmp_path / "abl" / "runs" / "default").glob(
        "fold[12]/seed0/oof.csv") for s in pd.read_csv(f)["sample"]])  # the extra clips are never scored
    stamps = {p: p.stat().st_mtime_ns for p in models}
    main(args)  # resume: nothing is recomputed, the same table comes out
    assert capsys.readouterr().out.splitlines()[1:] == table.splitlines()[1:]  # the header holds timings
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_a_generator_setting_that_does_not_exist_is_named(tmp_path):
    from mer.bench import main
    from mer.errors import UserError

    for flag in ("--synth-set", "--extra-synth-set"):
        with pytest.raises(UserError, match=f"{flag} widht=3: expected FIELD=VALUE with a generator setting"):
            main(["ablate", "--work", str(tmp_path), "--clips", "8", flag, "widht=3"])
    with pytest.raises(UserError, match="--synth-set subjects=6: subjects has its own option, --subjects"):
        main(["ablate", "--work", str(tmp_path), "--clips", "8", "--synth-set", "subjects=6"])
    assert not any(tmp_path.iterdir())  # refused before anything was generated


def test_bad_rows_and_folds_are_one_line_errors_before_anything_is_generated(tmp_path):
    for args, said in ((["--rows", "nope"], "error: --rows: unknown row(s) nope; rows: default"),
                       (["--folds", "1"], "argument --folds: needs 2 folds or more, got 1"),
                       (["--folds", "x"], "argument --folds: expected a number of folds, got 'x'")):
        out = subprocess.run([sys.executable, "-m", "mer.bench", "ablate", "--work", str(tmp_path), "--clips", "8",
                              *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())
