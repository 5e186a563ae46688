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
    assert ens["oof_uf1_nested_bias"] >= 0 and ens["oof"]["uf1"] >= ens["oof_uf1_weighted"] - 1e-12


def test_bias_search_never_lowers_the_score_it_reports():
    rng = np.random.default_rng(0)
    grid = np.linspace(-1.5, 1.5, 13)
    for trial in range(3):
        y = rng.integers(0, 5, 120)
        logp = rng.normal(0, 1, (120, 5)) + 1.5 * np.eye(5)[y] * rng.random(120)[:, None] - 0.8 * np.eye(5)[0]
        b = tune_biases(logp, y, grid, 2)
        base = scores(y, logp.argmax(1), 5)["uf1"]
        assert scores(y, (logp + b).argmax(1), 5)["uf1"] >= base
        before, after = nested_bias_gain(logp, y, rng.integers(0, 4, 120), grid, 2)
        assert before == pytest.approx(base)  # the nested figure is measured on held-out folds


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
    own = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq", "--no-archive"), cwd=ROOT,
                         capture_output=True, text=True)
    other = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq", "--no-archive",
                                "--cache", str(cdir)), cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert other.stdout == own.stdout
    wrong = cdir.parent / "0123456789ab"
    shutil.copytree(cdir, wrong)
    out = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "seq", "--cache", str(wrong)),
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "other settings" in out.stderr and out.stdout == ""
