"""End to end: raw generated frames -> cache -> models -> a validated submission, and ensembling."""

import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from mer.errors import UserError
from mer.ensembling import fit_ensemble, nested_bias_gain, tune_biases
from mer.metrics import scores
from mer.submission import validate


def _cmd(script, cfg, *args):
    return [sys.executable, str(ROOT / script), *args,
            "--set", f"train.run_dir={cfg['train']['run_dir']}",
            "--set", f"submission.out_dir={cfg['submission']['out_dir']}",
            "--set", f"preprocess.cache_dir={cfg['preprocess']['cache_dir']}"]


def _archives(cfg):
    return sorted(p for p in __import__("pathlib").Path(cfg["submission"]["out_dir"]).glob("*") if p.is_dir())


def test_predict_prints_only_the_csv_in_table_order_and_archives_the_upload(trained_runs, synth_root):
    cfg, runs = trained_runs
    before = _archives(cfg)
    out = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq",
                              "--truth", str(synth_root) + ".truth/test_B.csv"),
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Filename,EmotionId"
    table = pd.read_excel(synth_root / "test_B.xlsx", dtype={"Filename": str})
    sub = pd.read_csv(pd.io.common.StringIO(out.stdout), dtype={"Filename": str})
    assert list(sub["Filename"]) == list(table["Filename"])  # one row per table row, same order
    assert sub["EmotionId"].between(0, 6).all()
    assert "UF1" in out.stderr and "submission archived" in out.stderr  # logs on stderr only
    new = [p for p in _archives(cfg) if p not in before]
    assert len(new) == 1 and new[0].name.startswith("test_B-seq-")
    folder = new[0]
    txt = (folder / "prediction.txt").read_text().split()
    assert txt == [str(i) for i in sub["EmotionId"]]
    with zipfile.ZipFile(folder / "prediction.zip") as z:
        assert z.namelist() == ["prediction.txt"]
        assert z.read("prediction.txt").decode().split() == txt
    assert (folder / "config.yaml").is_file()
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["rows"] == len(table) and prov["scores"]["n"] == len(table)
    assert len(prov["runs"][0]["models"]) == 3 and prov["runs"][0]["oof"]["uf1"] > 0
    probs = pd.read_csv(folder / "probabilities.csv")
    assert np.allclose(probs.filter(like="p_").sum(axis=1), 1, atol=1e-5)


def test_ensemble_of_two_runs(trained_runs, synth_root):
    cfg, runs = trained_runs
    out = subprocess.run(_cmd("ensemble.py", cfg, "seq", "apex", "--split", "test_A"), cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sub = pd.read_csv(pd.io.common.StringIO(out.stdout), dtype={"Filename": str})
    table = pd.read_excel(synth_root / "test_A.xlsx", dtype={"Filename": str})
    assert list(sub["Filename"]) == list(table["Filename"])
    assert "ensemble of 2 run(s): weights" in out.stderr and "nested bias search" in out.stderr
    ens = fit_ensemble([runs["sequence"], runs["apex"]], cfg)
    assert abs(sum(ens["weights"]) - 1) < 1e-9
    # the reported figure, recomputed from the runs' own out-of-fold tables (report.py's oof_ensemble.csv)
    tabs = [pd.read_csv(runs[r] / "oof_ensemble.csv", dtype={"sample": str}).set_index("sample")
            for r in ("sequence", "apex")]
    p = sum(w * t.loc[tabs[0].index, [f"p_{i}" for i in range(7)]].to_numpy() for w, t in zip(ens["weights"], tabs))
    y = tabs[0]["label"].to_numpy().astype(int)
    assert ens["oof_uf1_no_bias"] == pytest.approx(scores(y, p.argmax(1), 7)["uf1"])
    assert ens["biases"] == [0.0] * 7 or ens["bias_used"]  # biases only when the honest gain is positive


def test_nested_bias_search_never_profits_from_the_fold_it_scores():
    """A planted leak: fold 0's labels are replaced by one class. Fold 0's predictions must not
    change (its biases come from the other folds), the other folds' must (fold 0 is in theirs)."""
    from mer.ensembling import nested_bias_predictions

    rng = np.random.default_rng(3)
    n, k = 300, 5
    y = rng.integers(0, k, n)
    folds = np.repeat(np.arange(5), n // 5)
    logp = rng.normal(0, 1, (n, k)) + 1.2 * np.eye(k)[y]
    grid = np.linspace(-1.5, 1.5, 13)
    leaked = y.copy()
    leaked[folds == 0] = 4
    a = nested_bias_predictions(logp, y, folds, grid, 2)
    b = nested_bias_predictions(logp, leaked, folds, grid, 2)
    np.testing.assert_array_equal(a[folds == 0], b[folds == 0])
    assert not np.array_equal(a[folds != 0], b[folds != 0])
    # and a search allowed to look at fold 0 would have profited from the leak there
    from mer.ensembling import tune_biases

    peek = (logp + tune_biases(logp, leaked, grid, 2)).argmax(1)
    assert (peek[folds == 0] == 4).mean() > (b[folds == 0] == 4).mean()


def test_bias_search_never_lowers_the_score_it_reports():
    rng = np.random.default_rng(0)
    grid = np.linspace(-1.5, 1.5, 13)
    planted, optimism = [], []
    for trial in range(5):
        y = rng.integers(0, 5, 120)
        logp = rng.normal(0, 1, (120, 5)) + 1.5 * np.eye(5)[y] * rng.random(120)[:, None] - 0.8 * np.eye(5)[0]
        b = tune_biases(logp, y, grid, 2)
        assert scores(y, (logp + b).argmax(1), 5)["uf1"] >= scores(y, logp.argmax(1), 5)["uf1"]
        # a bias against class 0 that every fold shares: learned on the other folds, it fixes the held-out one
        shared = rng.normal(0, 1, (120, 5)) + 2.0 * np.eye(5)[y] - 1.2 * np.eye(5)[0]
        before, after = nested_bias_gain(shared, y, np.arange(120) % 4, grid, 2)
        planted.append(after - before)
        # no signal at all: biases tuned in-sample look like a gain, the nested figure does not
        noise = rng.normal(0, 1, (120, 5))
        in_sample = scores(y, (noise + tune_biases(noise, y, grid, 2)).argmax(1), 5)["uf1"]
        before, after = nested_bias_gain(noise, y, np.arange(120) % 4, grid, 2)
        optimism.append(in_sample - before - (after - before))
    assert np.mean(planted) > 0.02 and min(planted) > 0
    assert np.mean(optimism) > 0.02


def test_validation_rejects_wrong_submissions():
    sub = pd.DataFrame({"Filename": ["a", "b"], "EmotionId": [1, 7]})
    with pytest.raises(UserError, match="outside 0..6 in row"):
        validate(sub, ["a", "b"], 7)
    with pytest.raises(UserError, match="row 1 is 'b' but the table's row 1 is 'a'"):
        validate(sub.iloc[::-1].reset_index(drop=True), ["a", "b"], 7)
    with pytest.raises(UserError, match="1 rows for 2 table rows"):
        validate(sub.iloc[:1], ["a", "b"], 7)
    with pytest.raises(UserError, match="empty or non-numeric"):
        validate(pd.DataFrame({"Filename": ["a"], "EmotionId": [None]}), ["a"], 7)


def test_missing_fold_missing_test_cache_and_frameless_row_give_errors_and_no_file(trained_runs, synth_root,
                                                                                      tmp_path):
    cfg, runs = trained_runs
    before = _archives(cfg)
    broken = runs["sequence"].parent / "seq_missing_fold"
    shutil.copytree(runs["sequence"], broken)
    shutil.rmtree(broken / "fold1")
    out = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", broken.name), cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert "no finished model for fold(s) 1" in out.stderr

    cdir = __import__("pathlib").Path(json.loads((runs["sequence"] / "run.json").read_text())["cache"])
    m = pd.read_csv(cdir / "test_B" / "manifest.csv", dtype={"sample": str})
    victim = cdir / m["file"][1]
    saved = victim.read_bytes()
    victim.unlink()
    try:
        out = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq"), cwd=ROOT,
                             capture_output=True, text=True)
    finally:
        victim.write_bytes(saved)
    assert out.returncode == 2 and out.stdout == ""
    assert "cache file missing" in out.stderr and victim.name in out.stderr

    m2 = m.astype({"status": object, "reason": object})
    m2.loc[0, ["status", "reason"]] = ["failed", "the first frames are unreadable"]
    m2.to_csv(cdir / "test_B" / "manifest.csv", index=False)
    try:
        out = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq"), cwd=ROOT,
                             capture_output=True, text=True)
    finally:
        m.to_csv(cdir / "test_B" / "manifest.csv", index=False)
    assert out.returncode == 2 and out.stdout == ""
    assert f"row 1 {m['sample'][0]} (failed: the first frames are unreadable)" in out.stderr
    assert _archives(cfg) == before  # no submission file was written

    root = tmp_path / "D"  # the test_B table with the first row's frames gone
    (root / "test_data_B").mkdir(parents=True)
    shutil.copy(synth_root / "test_B.xlsx", root)
    names = pd.read_excel(root / "test_B.xlsx", dtype={"Filename": str})["Filename"]
    first = names[0]
    for s in names[1:]:
        (root / "test_data_B" / s).symlink_to(synth_root / "test_data_B" / "test_data_B" / s)
    out = subprocess.run(_cmd("preprocess.py", cfg, "--root", str(root), "--splits", "test_B"), cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"[fatal] test_B/{first}: frame folder not found" in out.stderr


def test_predict_a_test_set_preprocessed_from_its_own_folder(trained_runs, synth_root, tmp_path):
    from mer.preprocessing import run

    cfg, runs = trained_runs
    root = tmp_path / "DFME_testB"  # test_B delivered alone, in its own folder
    (root / "frames").mkdir(parents=True)
    shutil.copy(synth_root / "test_B.xlsx", root)
    for s in pd.read_excel(root / "test_B.xlsx", dtype={"Filename": str})["Filename"]:
        (root / "frames" / s).symlink_to(synth_root / "test_data_B" / "test_data_B" / s)
    cdir = run(root, cfg)
    own = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq", "--no-archive", "--device",
                              "cpu"), cwd=ROOT, capture_output=True, text=True)  # bits compared: pinned to the CPU
    other = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq", "--no-archive",
                                "--device", "cpu", "--cache", str(cdir)), cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert other.stdout == own.stdout
    wrong = cdir.parent / "0123456789ab"
    shutil.copytree(cdir, wrong)
    out = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq", "--cache", str(wrong)),
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "other settings" in out.stderr and out.stdout == ""


def test_submission_is_checked_against_the_test_table_as_it_is_now(trained_runs, synth_root, tmp_path):
    """A table re-sorted, shortened or renamed since preprocessing is an error naming the first
    difference, never a silently reordered prediction.txt; a table merely re-saved is fine."""
    from mer.preprocessing import run

    cfg, runs = trained_runs
    root = tmp_path / "DFME_testB"
    (root / "frames").mkdir(parents=True)
    table = pd.read_excel(synth_root / "test_B.xlsx", dtype={"Filename": str})
    table.to_csv(root / "test_B.csv", index=False)
    for s in table["Filename"]:
        (root / "frames" / s).symlink_to(synth_root / "test_data_B" / "test_data_B" / s)
    cdir = run(root, cfg)
    meta = __import__("yaml").safe_load((cdir / "meta.yaml").read_text())
    stored = meta["tables"]["test_B"]
    assert stored["rows"] == len(table) and len(stored["file_sha256"]) == 64
    cmd = _cmd("predict.py", cfg, "--split", "test_B", "--name", "seq", "--cache", str(cdir))
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    folder = [p for p in _archives(cfg) if p.name.startswith("test_B-seq-")][-1]
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["table"]["samples_sha256"] == stored["samples_sha256"]

    table.iloc[::-1].to_csv(root / "test_B.csv", index=False)  # re-sorted after preprocessing
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert "does not match the cache" in out.stderr and "first difference at row 1" in out.stderr
    table.iloc[:-1].to_csv(root / "test_B.csv", index=False)  # a row less
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and f"{len(table) - 1} rows in the table, {len(table)} cached" in out.stderr
    table.to_csv(root / "test_B.csv", index=False, lineterminator="\r\n")  # same rows, other bytes
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "re-saved since preprocessing" in out.stderr and out.stdout == ok.stdout
    other = tmp_path / "Other"  # --root: the table of another dataset
    other.mkdir()
    pd.DataFrame({"Filename": ["x1", "x2"], "FPS": [200, 200]}).to_csv(other / "test_B.csv", index=False)
    out = subprocess.run(cmd + ["--root", str(other)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "2 rows in the table" in out.stderr


def test_a_moved_project_still_finds_its_cache_or_says_which_path_is_missing(trained_runs, tmp_path):
    from mer.predicting import run_cache, run_info

    cfg, runs = trained_runs
    run = runs["sequence"]
    info = run_info(run)
    cache = __import__("pathlib").Path(info["cache"])
    project = tmp_path / "moved"
    (project / "runs").mkdir(parents=True)
    shutil.copytree(run, project / "runs" / run.name)
    rel = info["cache_relative"]
    target = (project / "runs" / run.name / rel).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cache, target)
    moved_info = dict(info, cache=str(tmp_path / "gone" / cache.name))  # the old absolute path no longer exists
    assert run_cache(project / "runs" / run.name, moved_info) == target
    shutil.rmtree(target)
    with pytest.raises(UserError, match="cache of run .* is missing: not at .*gone.* nor at"):
        run_cache(project / "runs" / run.name, moved_info)


def test_annotated_apex_trains_but_out_of_fold_clips_are_scored_as_test_clips(synth_cache, tmp_path):
    """model.apex_source=annotated: the training side uses the table's apex map, the held-out
    fold the max-motion map (test clips have no annotated apex)."""
    from mer.training import _setup, load_clips

    cfg, cdir = synth_cache
    cfg = {**cfg, "model": {**cfg["model"], "name": "apex_cnn", "apex_source": "annotated"}}
    clips = load_clips(cdir, "train", "annotated")
    assert any(not np.array_equal(a, b) for a, b in zip(clips.apex, clips.apex_annotated))
    folds = np.arange(len(clips)) % 3
    from mer.features import roi_specs

    meta = {"cache": str(cdir), "classes": [str(i) for i in range(7)], "rois": roi_specs("default"),
            "channels": ["u", "v", "mag", "strain"]}
    st = _setup(clips, folds, 0, 0, cfg, meta, "cpu", None, None)
    tr, te = np.nonzero(folds != 0)[0], np.nonzero(folds == 0)[0]
    assert all(np.array_equal(a, clips.apex_annotated[i]) for a, i in zip(st.train_set.apex, tr))
    assert all(np.array_equal(a, clips.apex[i]) for a, i in zip(st.oof_set.apex, te))


def test_predict_applies_per_class_biases_only_when_their_nested_gain_is_positive(trained_runs, tmp_path, caplog):
    """predict.bias=nested (default): biases tuned on the run's out-of-fold predictions go into the
    submission when the same search, nested over the folds, gains. Planted here: out-of-fold
    tables of 300 clips whose class-0 logits are all lowered (a bias every fold shares, which
    the other folds can learn), in place of the tiny test run's own 28."""
    from mer.ensembling import oof_biases, predict_and_submit

    cfg, runs = trained_runs
    run = tmp_path / "runs" / "seq"
    shutil.copytree(runs["sequence"], run)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 300)
    logits = rng.normal(0, 1, (300, 7)) + 2.0 * np.eye(7)[y] - 1.2 * np.eye(7)[0]
    for f in run.glob("fold*/seed*/oof.csv"):
        f.unlink()
    for k in range(3):
        idx = np.arange(300)[np.arange(300) % 3 == k]
        t = pd.DataFrame({"sample": [f"c{i:03d}" for i in idx], "subject": [f"s{i % 30:02d}" for i in idx],
                          "dataset": "dfme", "label": y[idx], "fold": k, "seed": 0})
        for c in range(7):
            t[f"logit_{c}"] = logits[idx, c]
        (run / f"fold{k}" / "seed0").mkdir(parents=True, exist_ok=True)
        t.to_csv(run / f"fold{k}" / "seed0" / "oof.csv", index=False)
    out = tmp_path / "subs"

    def settings(bias):
        return {**cfg, "train": {**cfg["train"], "run_dir": str(tmp_path / "runs")},
                "predict": {**cfg["predict"], "bias": bias}, "submission": {**cfg["submission"], "out_dir": str(out)}}

    ens = oof_biases([run], settings("nested"))
    assert ens is not None and ens["bias_used"] and ens["bias_gain_nested"] > 0
    assert ens["biases"][0] == max(ens["biases"]) and ens["biases"][0] > 0
    for bias in ("nested", "none"):
        with caplog.at_level("INFO", logger="mer"):
            predict_and_submit(settings(bias), ["seq"], "test_A", "cpu")
        prov = json.loads(max(out.glob("test_A-seq-*"), key=lambda p: p.stat().st_mtime_ns)
                          .joinpath("provenance.json").read_text())
        assert prov["biases"] == (ens["biases"] if bias == "nested" else None), bias
    assert "per-class biases (predict.bias=nested)" in caplog.text
    # pure noise: the nested search does not gain, no biases
    for f in run.glob("fold*/seed*/oof.csv"):
        t = pd.read_csv(f, dtype={"sample": str, "subject": str, "dataset": str})
        t[[f"logit_{c}" for c in range(7)]] = rng.normal(0, 1, (len(t), 7))
        t.to_csv(f, index=False)
    assert oof_biases([run], settings("nested")) is None
    # one fold's predictions cannot be nested: said, and no biases
    for f in run.glob("fold*/seed*/oof.csv"):
        if f.parts[-3] != "fold0":
            f.unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="mer"):
        assert oof_biases([run], settings("nested")) is None
    assert "needs out-of-fold predictions of 2 or more folds" in caplog.text
    with pytest.raises(UserError, match="predict.bias must be nested or none"):
        oof_biases([run], settings("always"))
