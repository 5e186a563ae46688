"""End to end on the released layouts and with declared extra training data.

A second generated set is laid out as the released databases are (CASME II folders and table;
CAS(ME)^3 recordings holding several MEs), preprocessed and trained leave-one-subject-out with
the composite protocol; then it is declared as extra training data of the session's DFME run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, small_config, work_config
from mer.errors import UserError


@pytest.fixture(scope="module")
def second_set(tmp_path_factory):
    """(frames root, table) of a second generated set: three subjects, four clips each."""
    from mer.synth import generate

    gen = tmp_path_factory.mktemp("second") / "gen"
    rows = generate(gen, small_config(subjects=3, clips_per_subject=4, split_subjects=(3, 0, 0), seed=23),
                    workers=2)
    return gen, rows[rows["Split"] == "train"].reset_index(drop=True)


@pytest.fixture(scope="module")
def megc_root(second_set, tmp_path_factory):
    """MEGC/CASME2 (two subjects, one folder per clip) and MEGC/CASME3 (one subject, two MEs in one
    recording), built from the second generated set (frames linked, not copied)."""
    gen, rows = second_set
    base = tmp_path_factory.mktemp("megc")
    subjects = sorted(rows["Subject"].unique())
    root = base / "MEGC"
    c2 = rows[rows["Subject"].isin(subjects[:2])].reset_index(drop=True)
    (root / "CASME2" / "CASME2_RAW_selected").mkdir(parents=True)
    table = pd.DataFrame({"Subject": [subjects.index(s) + 1 for s in c2["Subject"]],
                          "Filename": [f"EP{k:02d}_01" for k in range(len(c2))],
                          "OnsetFrame": c2["OnsetFrame"], "ApexFrame": c2["ApexFrame"], "OffsetFrame": c2["OffsetFrame"],
                          "Action Units": c2["AU"], "Estimated Emotion": c2["Emotion"]})
    table.to_excel(root / "CASME2" / "CASME2-coding.xlsx", index=False)
    for r, f in zip(table.itertuples(), c2["Filename"]):
        sub = root / "CASME2" / "CASME2_RAW_selected" / f"sub{r.Subject:02d}"
        sub.mkdir(exist_ok=True)
        (sub / r.Filename).symlink_to(gen / "train_data" / f)
    c3 = rows[rows["Subject"] == subjects[2]].reset_index(drop=True)
    recordings = {"a": [0, 1], "b": [2], "c": [3]}  # recording 'a' holds two micro-expressions
    table = []
    for rec, clips in recordings.items():
        color = root / "CASME3" / "spNO.7" / rec / "color"
        color.mkdir(parents=True)
        start = 0
        for i in clips:
            r = c3.loc[i]
            frames = sorted((gen / "train_data" / r["Filename"]).glob("*.png"))
            for k, f in enumerate(frames):
                (color / f"{start + k}.png").symlink_to(f)
            table.append(("spNO.7", rec, start + r["OnsetFrame"] - 1, start + r["ApexFrame"] - 1,
                          start + r["OffsetFrame"] - 1, r["AU"], "I", r["Emotion"]))
            start += len(frames) + 5
    pd.DataFrame(table, columns=["Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class",
                                 "emotion"]).to_excel(root / "CASME3" / "casme3_part_A.xlsx", index=False)
    return root


@pytest.fixture(scope="module")
def megc_cache(megc_root, tmp_path_factory):
    from mer.preprocessing import run

    cfg = work_config(tmp_path_factory.mktemp("megc_work"), **{"train.protocol": "loso", "train.epochs": 2,
                                                                 "train.min_steps": 4})
    return cfg, run(megc_root, cfg, workers=2)


def test_composite_preprocessed_and_trained_leave_one_subject_out(megc_cache):
    from mer.training import run_training

    cfg, cdir = megc_cache
    meta = yaml.safe_load((cdir / "meta.yaml").read_text())
    assert meta["dataset"] == "composite-3class" and meta["databases"] == ["casme2", "casme3"]
    manifest = pd.read_csv(cdir / "train" / "manifest.csv")
    assert set(manifest["dataset"]) == {"casme2", "casme3"} and (manifest["status"] == "ok").all()
    assert {"casme3_spNO.7_a_" in s for s in manifest["sample"]} == {True, False}
    assert sum(s.startswith("casme3_spNO.7_a_") for s in manifest["sample"]) == 2  # two MEs, one recording
    run_dir = run_training(cdir, cfg, "megc", jobs=1)
    folds = pd.read_csv(run_dir / "folds.csv")
    assert folds["fold"].nunique() == folds["subject"].nunique() == 3  # leave one subject out
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["complete"] and set(rep["per_database"]) == {"casme2", "casme3"}
    assert sum(v["n"] for v in rep["per_database"].values()) == rep["n_clips"] == 12
    md = (run_dir / "report.md").read_text()
    assert "| casme2 | 8 |" in md and "| casme3 | 4 |" in md and "Extra training data: none." in md


def _cmd(script, cfg, *args):
    return [sys.executable, str(ROOT / script), *args,
            "--set", f"train.run_dir={cfg['train']['run_dir']}",
            "--set", f"submission.out_dir={cfg['submission']['out_dir']}",
            "--set", f"preprocess.cache_dir={cfg['preprocess']['cache_dir']}"]


def test_extra_training_data_end_to_end(synth_cache, synth_root, megc_cache):
    cfg, cdir = synth_cache
    _, extra_cache = megc_cache
    fast = ["--seeds", "0"] + [a for k in ("train.epochs=2", "train.min_steps=4", "train.folds=3",
                                           "model.sequence.depth=2", "model.sequence.dim=32",
                                           "model.sequence.heads=4") for a in ("--set", k)]
    mapping = ["--set", "train.extra_class_map.negative=disgust", "--set", "train.extra_class_map.positive=happiness"]
    out = subprocess.run(_cmd("train.py", cfg, "--cache", str(cdir), "--name", "with_extra", "--extra",
                              str(extra_cache), *mapping, *fast), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    run_dir = Path(cfg["train"]["run_dir"]) / "with_extra"
    info = json.loads((run_dir / "run.json").read_text())
    [rec] = info["extra"]
    assert rec["dataset"] == "composite-3class" and rec["clips"] == 12 and rec["not_used"] == {}
    assert rec["class_map"] == {"negative": "disgust", "positive": "happiness", "surprise": "surprise"}
    own = pd.read_csv(cdir / "train" / "manifest.csv", dtype={"sample": str})
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"sample": str})
    assert sorted(folds["sample"]) == sorted(own["sample"])  # extra clips are in no fold
    oof = pd.concat(pd.read_csv(p, dtype={"sample": str}) for p in run_dir.glob("fold*/seed0/oof.csv"))
    assert sorted(oof["sample"]) == sorted(own["sample"])  # and never scored
    for p in run_dir.glob("fold*/seed0/result.json"):
        res = json.loads(p.read_text())
        assert res["n_extra"] == 12 and res["n_train"] == res["n_extra"] + len(own) - res["n_oof"]
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["extra"][0]["cache"] == str(extra_cache.resolve())
    assert "Extra training data (declared" in (run_dir / "report.md").read_text()
    assert "composite-3class from" in (run_dir / "report.md").read_text()
    # the same run without the extra data is refused (a job array must pass the same --extra)
    again = subprocess.run(_cmd("train.py", cfg, "--cache", str(cdir), "--name", "with_extra", *fast), cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "train.extra" in again.stderr
    pred = subprocess.run(_cmd("predict.py", cfg, "--split", "test_B", "--name", "with_extra"), cwd=ROOT,
                          capture_output=True, text=True)
    assert pred.returncode == 0, pred.stderr
    folder = max(Path(cfg["submission"]["out_dir"]).glob("test_B-with_extra-*"))
    prov = json.loads((folder / "provenance.json").read_text())
    assert [e["dataset"] for e in prov["extra_training_data"]] == ["composite-3class"]
    assert prov["extra_training_data"][0]["clips"] == 12 and prov["extra_training_data"][0]["root"].endswith("MEGC")


def test_extra_data_must_match_the_run_settings_and_exist(synth_cache, megc_root, megc_cache, tmp_path):
    from mer.extra import class_mapping, resolve_extra_cache

    cfg, cdir = synth_cache
    mcfg, extra_cache = megc_cache
    assert resolve_extra_cache(extra_cache, cfg, cdir) == extra_cache
    other = tmp_path / "cache" / "MEGC" / "0123456789ab"
    shutil.copytree(extra_cache, other)
    saved = yaml.safe_load((other / "config.yaml").read_text())
    saved["preprocess"]["top_frac"] = 0.5
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(UserError, match=r"other settings than the run's cache .*differ: preprocess.top_frac.*"
                                        r"python preprocess.py --root"):
        resolve_extra_cache(other, cfg, cdir)
    with pytest.raises(UserError, match=r"no cache under .*run `python preprocess.py --root"):
        resolve_extra_cache(tmp_path, cfg, cdir)
    with pytest.raises(UserError, match="the run's own dataset"):
        resolve_extra_cache(cdir, cfg, cdir)
    # by root: the cache of that dataset made with the run's preprocess settings
    by_root = dict(cfg, preprocess={**cfg["preprocess"], "cache_dir": mcfg["preprocess"]["cache_dir"]})
    assert resolve_extra_cache(megc_root, by_root, cdir) == extra_cache
    dfme = ["anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise"]
    assert class_mapping(["disgust", "others", "repression", "happiness"], dfme, {"repression": None}) == \
        {"disgust": "disgust", "others": None, "repression": None, "happiness": "happiness"}
    assert class_mapping(["sadness", "others"], ["negative", "positive", "surprise"], {})["sadness"] == "negative"
    with pytest.raises(UserError, match="maps 'others' to 'bored'"):
        class_mapping(["others"], dfme, {"others": "bored"})


@pytest.fixture(scope="module")
def released_roots(second_set, tmp_path_factory):
    """A SAMM tree (title block above the columns, `006/006_1_2/006_05562.jpg`), a CAS(ME)^3
    tree (`spNO.1/a/color/<n>.png`, every subject's MEs in one recording) and a CASME II tree
    (`sub01/EP01_01/img<n>.jpg`), three subjects each, from the second generated set (frames
    linked, not copied)."""
    gen, rows = second_set
    base = tmp_path_factory.mktemp("released")
    subjects = sorted(rows["Subject"].unique())
    samm, casme3, casme2 = base / "SAMM", base / "CASME3", base / "CASME2"
    samm_rows, casme3_rows, casme2_rows = [], [], []
    for s, subject in enumerate(subjects):
        start = 0
        for k, r in enumerate(rows[rows["Subject"] == subject].itertuples()):
            frames = sorted((gen / "train_data" / r.Filename).glob("*.png"))
            sid, name, first = 6 + s, f"{6 + s:03d}_1_{k + 1}", 1000 + 300 * k
            for n, f in enumerate(frames):
                (samm / f"{sid:03d}" / name).mkdir(parents=True, exist_ok=True)
                (samm / f"{sid:03d}" / name / f"{sid:03d}_{first + n:05d}.jpg").symlink_to(f)
                (casme3 / f"spNO.{s + 1}" / "a" / "color").mkdir(parents=True, exist_ok=True)
                (casme3 / f"spNO.{s + 1}" / "a" / "color" / f"{start + n}.png").symlink_to(f)
                (casme2 / f"sub{s + 1:02d}" / f"EP{k + 1:02d}_01").mkdir(parents=True, exist_ok=True)
                (casme2 / f"sub{s + 1:02d}" / f"EP{k + 1:02d}_01" / f"img{first + n}.jpg").symlink_to(f)
            emotion = r.Emotion.capitalize() if r.Emotion in ("anger", "contempt", "happiness", "surprise") else "Other"
            samm_rows.append([sid, name, 1, first + r.OnsetFrame - 1, first + r.ApexFrame - 1,
                              first + r.OffsetFrame - 1, r.OffsetFrame - r.OnsetFrame + 1, "Micro - 1/2", r.AU,
                              None, emotion])
            casme3_rows.append((f"spNO.{s + 1}", "a", start + r.OnsetFrame - 1, start + r.ApexFrame - 1,
                                start + r.OffsetFrame - 1, r.AU, "I",
                                "others" if r.Emotion == "contempt" else r.Emotion))  # no contempt in CAS(ME)^3
            casme2_rows.append((s + 1, f"EP{k + 1:02d}_01", first + r.OnsetFrame - 1, first + r.ApexFrame - 1,
                                first + r.OffsetFrame - 1, r.AU,
                                r.Emotion if r.Emotion in ("disgust", "happiness", "surprise") else "others"))
            start += len(frames) + 5
    pd.DataFrame(casme2_rows, columns=["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame",
                                       "Action Units", "Estimated Emotion"]).to_excel(casme2 / "CASME2-coding.xlsx",
                                                                                      index=False)
    columns = ["Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame", "Offset Frame", "Duration",
               "Type", "Action Units", "Notes", "Estimated Emotion"]
    block = [["SAMM: Spontaneous Micro-Facial Movement Dataset"] + [None] * 10] + [[None] * 11] * 3
    pd.DataFrame(block + [columns] + samm_rows).to_excel(samm / "SAMM_Micro_FACS_Codes_v2.xlsx", index=False,
                                                         header=False)
    pd.DataFrame(casme3_rows, columns=["Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class",
                                       "emotion"]).to_excel(casme3 / "casme3_part_A.xlsx", index=False)
    return {"samm": samm, "casme3": casme3, "casme2": casme2}


@pytest.mark.parametrize("database, protocol, name", [("samm", "all", "samm-all"),
                                                      ("casme3", "7class", "casme3-7class"),
                                                      ("casme2", "5class", "casme2-5class")])
def test_one_released_database_through_the_scripts_leave_one_subject_out(released_roots, tmp_path, database,
                                                                         protocol, name):
    root = released_roots[database]
    sets = [a for k in (f"preprocess.cache_dir={tmp_path / 'cache'}", f"train.run_dir={tmp_path / 'runs'}",
                        f"data.protocol={protocol}", "train.protocol=loso", "train.epochs=2", "train.min_steps=4",
                        "model.sequence.depth=1", "model.sequence.dim=32", "model.sequence.heads=4")
            for a in ("--set", k)]
    seen = subprocess.run([sys.executable, "-m", "mer.data", "--root", str(root), *sets], cwd=ROOT,
                          capture_output=True, text=True)
    assert seen.returncode == 0, seen.stderr
    assert f"{name} at {root}: 12 clips" in seen.stdout and "train: 12 clips, 3 subjects" in seen.stdout
    pre = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--root", str(root), "--workers", "2", *sets],
                         cwd=ROOT, capture_output=True, text=True)
    assert pre.returncode == 0, pre.stderr
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "--root", str(root), "--fold", "all",
                            "--seeds", "0", "--name", database, *sets], cwd=ROOT, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    run_dir = tmp_path / "runs" / database
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"sample": str})
    assert len(folds) == 12 and folds["fold"].nunique() == folds["subject"].nunique() == 3  # one subject per fold
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["complete"] and rep["n_clips"] == 12 and rep["folds"] == 3 and rep["protocol"] == "loso"
    assert "leave-one-subject-out (3 folds)" in (run_dir / "report.md").read_text()
