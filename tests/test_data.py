"""Readers and validation on hand-made trees: every validation case feeds bad input and checks the message."""

import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import write_frames
from mer.errors import UserError
from mer.config import load_config
from mer.data import (
    canonical_emotion, class_map_from_table, frame_number, list_frames, load_dataset, resolve_issues,
)


def load(root, *sets):
    return load_dataset(root, load_config(overrides=list(sets)))


def messages(ds):
    return [str(i) for i in ds.issues]


def test_dfme_reader_normalises_aliases_chinese_and_nested_folders(tiny_dfme):
    ds = load(tiny_dfme)
    t = ds.table
    assert ds.issues == []
    assert list(t["split"]) == ["train"] * 4 + ["test_A"] * 2 + ["test_B"]
    assert list(t["emotion"][:4]) == ["happiness", "surprise", "disgust", "anger"]
    assert list(t["label"][:4]) == [4, 6, 2, 0]
    assert t["label"][4:].isna().all() and (t["emotion"][4:] == "").all()  # unknown stays empty
    assert t.loc[t["sample"] == "d_1", "frames_dir"].item().endswith("test_data_B/test_data_B/d_1")
    assert list(t["fps"]) == [200, 300, 500, 200, 300, 500, 200]
    assert list(t.loc[t["split"] == "test_A", "row"]) == [0, 1]
    assert t.loc[0, "onset"] == 1 and t.loc[2, "apex"] == 3


def test_frames_sorted_by_number_not_text(tmp_path):
    write_frames(tmp_path / "c", 12, digits=1)  # 1.png .. 12.png
    frames = list_frames(tmp_path / "c")
    assert [frame_number(f) for f in frames] == list(range(1, 13))
    assert frame_number("img_0042.jpg") == 42 and frame_number("reg_img7.png") == 7


def test_a_frame_number_carried_by_two_files_uses_one_and_warns(tiny_dfme):
    """A clip folder converted in place (00001.png beside 00001.jpg): one file per frame number,
    the first of data.image_exts, one warning naming the row; clips without twins are untouched."""
    from mer.frames import FolderFrames

    write_frames(tiny_dfme / "train_data" / "a_2", 6, ext=".jpg")  # a_2 holds 00001..00006.png already
    ds = load(tiny_dfme)
    t = ds.table.set_index("sample")
    assert t.loc["a_2", "frame_files"] == tuple(f"{k:05d}.png" for k in range(1, 7))
    assert messages(ds) == ["[warn] train/a_2: 6 frame file(s) carry the number of another (e.g. 00001.jpg): one file "
                            "per frame number is used, the first of data.image_exts (.png, .jpg, .jpeg, .bmp, .tif, "
                            ".tiff, .webp), then by name (move the others out of the folder to silence this)"]
    frames = FolderFrames.of(tiny_dfme / "train_data" / "a_2", (".jpg", ".png"))  # preference as given
    assert [os.path.basename(p) for p in frames.paths] == [f"{k:05d}.jpg" for k in range(1, 7)]
    assert list(frames.numbers) == list(range(1, 7))


@pytest.mark.parametrize("raw,name", [("Happy", "happiness"), ("HAPPINESS", "happiness"), ("sad", "sadness"),
                                      ("angry", "anger"), ("高兴", "happiness"), ("伤心", "sadness"),
                                      ("惊讶", "surprise"), ("鄙视", "contempt"), ("恐惧", "fear"),
                                      (" Disgust ", "disgust"), ("愤怒", "anger"), ("meh", None)])
def test_emotion_aliases(raw, name):
    assert canonical_emotion(raw) == name


def test_class_map_derived_from_table_when_ids_differ():
    names = pd.Series(["happy", "anger", "surprise"])
    ids = pd.Series([0, 1, 2])
    classes = class_map_from_table(names, ids, ["anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise"], "t")
    assert classes[:3] == ["happiness", "anger", "surprise"] and len(set(classes)) == 7
    with pytest.raises(UserError, match="EmotionId 0 is used for both"):
        class_map_from_table(pd.Series(["happy", "sad"]), pd.Series([0, 0]), ["happiness", "sadness"], "t")


def test_missing_column_lists_columns_found(tiny_dfme):
    pd.DataFrame({"Clip": ["c_1"], "Speed": [3]}).to_csv(tiny_dfme / "test_A.csv", index=False)
    with pytest.raises(UserError, match=r"test_A.csv: no column for fps .*columns found: Clip, Speed"):
        ds = load(tiny_dfme)
        resolve_issues(ds)
    # a frame rate given in the config makes the column optional
    ds = load(tiny_dfme, "data.fps=200")
    assert (ds.split("test_A")["fps"] == 200).all()


def test_unreadable_table_is_a_clear_error(tiny_dfme):
    (tiny_dfme / "train.xlsx").write_bytes(b"this is not a spreadsheet")
    with pytest.raises(UserError, match=r"cannot read annotation table .*train.xlsx"):
        load(tiny_dfme)


def test_no_tables_and_ambiguous_tables(tmp_path, tiny_dfme):
    with pytest.raises(UserError, match="no annotation table found"):
        load(tmp_path / "DFME" / "train_data")
    shutil.copy(tiny_dfme / "train.xlsx", tiny_dfme / "train_old.xlsx")
    with pytest.raises(UserError, match=r"several tables look like the train table.*data.tables.train"):
        load(tiny_dfme)
    assert len(load(tiny_dfme, "data.tables.train=train.xlsx").split("train")) == 4


def test_missing_and_empty_frame_folders(tiny_dfme, caplog):
    shutil.rmtree(tiny_dfme / "train_data" / "a_2")
    for f in (tiny_dfme / "train_data" / "b_1").iterdir():
        f.unlink()
    ds = load(tiny_dfme)
    msgs = messages(ds)
    assert any("train/a_2: frame folder not found (no folder named 'a_2'" in m for m in msgs)
    assert any("train/b_1: no image frames in" in m for m in msgs)
    with caplog.at_level(logging.WARNING):
        kept = resolve_issues(ds)
    assert set(kept.split("train")["sample"]) == {"a_1", "b_2"}  # train rows skipped, reported
    assert "[skip] train/a_2" in caplog.text and "[skip] train/b_1" in caplog.text


def test_test_row_without_frames_is_fatal(tiny_dfme, caplog):
    shutil.rmtree(tiny_dfme / "test_data_A" / "c_2")
    ds = load(tiny_dfme)
    with caplog.at_level(logging.ERROR), pytest.raises(UserError, match="1 fatal problem"):
        resolve_issues(ds)
    assert "[fatal] test_A/c_2: frame folder not found" in caplog.text
    # other splits alone are fine
    assert len(resolve_issues(ds, ["train", "test_B"]).table) == 5


def test_duplicate_samples_are_fatal(tiny_dfme):
    t = pd.read_excel(tiny_dfme / "train.xlsx")
    t.loc[1, "Filename"] = "a_1"
    t.to_excel(tiny_dfme / "train.xlsx", index=False)
    ds = load(tiny_dfme)
    assert any("[fatal] train/a_1: sample listed 2 times (table rows 2, 3)" in m for m in messages(ds))
    with pytest.raises(UserError):
        resolve_issues(ds)


def test_labels_outside_class_map_are_skipped(tiny_dfme):
    t = pd.read_excel(tiny_dfme / "train.xlsx")
    t["Emotion"] = ["happy", "bored", "others", "anger"]
    t["EmotionId"] = [4, 9, 7, 0]
    t.to_excel(tiny_dfme / "train.xlsx", index=False)
    msgs = messages(load(tiny_dfme))
    assert any("[skip] train/a_2: emotion 'bored' is not one of" in m for m in msgs)
    assert any("[skip] train/b_1: emotion 'others' is outside the class map" in m for m in msgs)
    t = t.drop(columns=["Emotion"])
    t.to_excel(tiny_dfme / "train.xlsx", index=False)
    msgs = messages(load(tiny_dfme))
    assert any("[skip] train/a_2: label 9 is outside the class ids 0..6" in m for m in msgs)


def test_key_frames_outside_frames_present_are_ignored_one_by_one_not_invented(tiny_dfme):
    t = pd.read_excel(tiny_dfme / "train.xlsx")
    t.loc[0, "OffsetFrame"] = 40
    t.to_excel(tiny_dfme / "train.xlsx", index=False)
    ds = load(tiny_dfme)
    assert ("[warn] train/a_1: offset 40 outside the frames present (1..6): offset ignored (onset, apex kept)"
            in messages(ds))
    row = resolve_issues(ds).table.iloc[0]
    assert row["sample"] == "a_1" and pd.isna(row["offset"]) and row["onset"] == 1 and row["apex"] == 3


def test_subject_in_two_splits_is_fatal(tiny_dfme):
    pd.DataFrame({"Filename": ["d_1"], "Subject": ["a"], "FPS": [200]}).to_excel(tiny_dfme / "test_B.xlsx", index=False)
    ds = load(tiny_dfme)
    assert any("subject 'a' appears in several splits (train, test_B)" in m for m in messages(ds))
    with pytest.raises(UserError):
        resolve_issues(ds)


def test_missing_frame_rate_in_test_is_fatal(tiny_dfme):
    pd.DataFrame({"Filename": ["c_1", "c_2"], "FPS": [300, None]}).to_csv(tiny_dfme / "test_A.csv", index=False)
    ds = load(tiny_dfme)
    assert any("[fatal] test_A/c_2: no frame rate (add an FPS column or set data.fps)" in m for m in messages(ds))


def test_generic_manifest(tmp_path):
    for s in ("x1", "x2", "y1"):
        write_frames(tmp_path / "clips" / s, 5)
    pd.DataFrame({"sample": ["x1", "x2", "y1"], "subject": ["x", "x", "y"], "emotion": ["fear", "sad", ""],
                  "fps": [100, 100, 100], "frames": ["clips/x1", "clips/x2", "clips/y1"],
                  "split": ["train", "train", "test_B"]}).to_csv(tmp_path / "m.csv", index=False)
    ds = load(tmp_path / "m.csv")
    assert ds.name == "manifest" and ds.classes == ["fear", "sadness"]
    assert list(ds.table["label"][:2]) == [0, 1] and pd.isna(ds.table["label"][2])
    assert list(ds.table["split"]) == ["train", "train", "test_B"]
    shutil.rmtree(tmp_path / "clips" / "x2")
    assert any("train/x2: frame folder not found" in m for m in messages(load(tmp_path / "m.csv")))


def test_test_rows_with_label_columns_are_never_dropped(tiny_dfme):
    pd.DataFrame({"Filename": ["c_1", "c_2"], "FPS": [300, 500], "EmotionId": [-1, "?"]}).to_csv(
        tiny_dfme / "test_A.csv", index=False)
    ds = resolve_issues(load(tiny_dfme))
    assert list(ds.split("test_A")["sample"]) == ["c_1", "c_2"]


def test_single_column_csv_and_leading_zeros_are_kept(tiny_dfme):
    (tiny_dfme / "test_A.csv").write_text("Filename\nc_1\nc_2\n")
    ds = load(tiny_dfme, "data.fps=300")
    assert list(ds.split("test_A")["sample"]) == ["c_1", "c_2"]
    write_frames(tiny_dfme / "test_data_B" / "0007", 5)
    (tiny_dfme / "test_B.xlsx").unlink()
    (tiny_dfme / "test_B.csv").write_text("Filename,FPS\n0007,200\n")
    assert list(load(tiny_dfme, "data.fps=300").split("test_B")["sample"]) == ["0007"]


def test_one_based_emotion_ids_are_refused_until_the_base_is_declared(tiny_dfme):
    t = pd.read_excel(tiny_dfme / "train.xlsx")
    t["EmotionId"] = [5, 7, 3, 1]  # happiness, surprise, disgust, anger counted from 1
    t.to_excel(tiny_dfme / "train.xlsx", index=False)
    with pytest.raises(UserError, match=r"EmotionId runs 1..7: declare the base with --set data.label_base=1"):
        load(tiny_dfme)
    ds = load(tiny_dfme, "data.label_base=1")
    assert list(ds.split("train")["emotion"]) == ["happiness", "surprise", "disgust", "anger"]
    assert ds.label_base == 1


def test_ids_only_table_counted_from_one_is_not_shifted_silently(tiny_dfme):
    t = pd.read_excel(tiny_dfme / "train.xlsx").drop(columns=["Emotion"])
    t["EmotionId"] = [5, 7, 3, 1]
    t.to_excel(tiny_dfme / "train.xlsx", index=False)
    with pytest.raises(UserError, match=r"EmotionId runs 1..7 and there is no emotion name column: declare the base "
                                        r"with --set data.label_base=1 .* or --set data.label_base=0"):
        load(tiny_dfme)
    one = load(tiny_dfme, "data.label_base=1")
    assert list(one.split("train")["label"]) == [4, 6, 2, 0] and one.label_base == 1
    assert list(one.split("train")["emotion"]) == ["happiness", "surprise", "disgust", "anger"]
    zero = load(tiny_dfme, "data.label_base=0")  # declared 0-based: id 7 is outside the class map
    assert "[skip] train/a_2: label 7 is outside the class ids 0..6" in messages(zero)
    assert list(zero.split("train")["label"])[::2] == [5, 3]
    with pytest.raises(UserError, match="data.label_base must be auto, 0 or 1"):
        load(tiny_dfme, "data.label_base=2")


def test_submission_ids_follow_the_declared_base():
    from mer.submission import build, validate

    probs = np.eye(3)[[2, 0, 1]]
    sub = build(["x", "y", "z"], probs, ["a", "b", "c"], base=1)
    assert list(sub["EmotionId"]) == [3, 1, 2]
    validate(sub, ["x", "y", "z"], 3, base=1)
    with pytest.raises(UserError, match=r"outside 0..2"):
        validate(sub, ["x", "y", "z"], 3)


def test_reading_a_dataset_and_its_frame_lists_lists_every_folder_once(tmp_path):
    """One walk of the frame tree: recognising the database, finding its tables, indexing its
    folders, checking the frames and listing each clip's frames for preprocessing share it."""
    from mer.bench import ListingCounter, make_empty_tree
    from mer.frames import FolderFrames
    from mer.preprocessing import clips_of

    make_empty_tree(tmp_path / "D", clips=12, frames=30)
    with ListingCounter() as lc:
        ds = load_dataset(tmp_path / "D", load_config())
        clips = clips_of(ds, ["train"], load_config()["data"]["image_exts"])
        assert all(c.files is not None and len(c.files) == 30 for c in clips)
        assert sum(len(FolderFrames.of(c.frames_dir, c.exts, c.start_frame, c.end_frame, c.files)) for c in clips) == 360
    assert len(ds.table) == 12 and lc.counts and max(lc.counts.values()) == 1, lc.counts.most_common(3)
