"""CASME II, SAMM, CAS(ME)^3 and the composite protocol, read from hand-made tables that reproduce
each quirk of the released ones (several MEs per recording, offsets of 0, apexes outside the clip,
SAMM's header block, CASME II rows without an apex, every AU form)."""

import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT
from mer.errors import UserError
from mer.config import load_config
from mer.data import load_dataset, resolve_issues


def load(root, *sets):
    return load_dataset(root, load_config(overrides=list(sets)))


def messages(ds):
    return [str(i) for i in ds.issues]


def touch_frames(folder, numbers, pattern="{}.jpg"):
    """Frame files named by number (empty: readers only list them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        (folder / pattern.format(n)).touch()


# ----------------------------------------------------------------------------- CAS(ME)^3

CASME3_ROWS = [  # Subject, Filename, Onset, Apex, Offset, AU, Objective class, emotion
    ("spNO.1", "e", 62, 68, 96, "R12", "I", "others"),
    ("spNO.1", "e", 96, 102, 106, "R12", "I", "others"),   # the same recording holds several MEs
    ("spNO.1", "e", 130, 133, 140, "4+L10", "III", "disgust"),
    ("spNO.1", "h", 5, 9, 15, "2+1", "II", "surprise"),
    ("spNO.2", "e", 10, 14, 20, "T28+14", "VII", "anger"),  # recording 'e' of another subject
    ("spNO.2", "g", 30, 36, 0, "14+soft focus", "VII", "others"),  # offset 0, an AU token nobody reads
    ("spNO.2", "g", 50, 47, 60, "B23", "VII", "sad"),       # apex before the onset
    ("spNO.3", "a", 3, 90, 12, "12", "II", "happy"),        # apex after the offset, past the frames present
    ("spNO.3", "b", 2, 4, 8, "R1+R2", "II", "fear"),
]
CASME3_COLUMNS = ["Subject", "Filename", "Onset", "Apex", "Offset", "AU", "Objective class", "emotion"]


def casme3_tree(root, rows=CASME3_ROWS):
    root.mkdir(parents=True)
    df = pd.DataFrame(rows, columns=CASME3_COLUMNS)
    df["AU_Split"] = [",".join(a.replace("L", "").replace("R", "").replace("T", "").replace("B", "").split("+"))
                      for a in df["AU"]]  # the parsed copy some releases carry beside the AU string
    df.to_excel(root / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", index=False, sheet_name="label")
    for (s, f), g in df.groupby(["Subject", "Filename"]):
        touch_frames(root / s / f / "color", range(0, int(max(g["Offset"].max(), g["Onset"].max())) + 20))
    return df


def check(root, *args):
    """`python -m mer.data --root ROOT`: exit code, stdout, stderr."""
    out = subprocess.run([sys.executable, "-m", "mer.data", "--root", str(root), *args], cwd=ROOT,
                         capture_output=True, text=True)
    return out.returncode, out.stdout, out.stderr


def test_casme3_as_released_loads_every_row(tmp_path):
    root = tmp_path / "CASME3"
    casme3_tree(root)
    code, out, err = check(root)
    assert code == 0, err
    assert "casme3-7class" in out and "9 clips from 9 table rows (0 not used" in out
    assert len([line for line in err.splitlines() if "[warn]" in line]) == 3
    [line] = [line for line in err.splitlines() if "spNO.2_g_30" in line]  # two problems, one line
    assert "offset 0 is not after onset 30" in line and "'soft focus' not understood" in line
    ds = load(root)
    t = ds.table.set_index("sample")
    assert list(ds.table["sample"]) == ["spNO.1_e_62", "spNO.1_e_96", "spNO.1_e_130", "spNO.1_h_5", "spNO.2_e_10",
                                        "spNO.2_g_30", "spNO.2_g_50", "spNO.3_a_3", "spNO.3_b_2"]
    assert t.loc["spNO.1_e_96", "frames_dir"] == str(root / "spNO.1" / "e" / "color")
    assert (t.loc["spNO.1_e_96", ["start_frame", "apex", "end_frame"]] == [96, 102, 106]).all()
    assert (t["fps"] == 30).all() and set(t["subject"]) == {"spNO.1", "spNO.2", "spNO.3"}
    msgs = messages(ds)
    # offset 0: the clip ends missing_offset_ms (500 ms = 15 frames at 30 fps) after the apex
    assert ("[warn] train/spNO.2_g_30: offset 0 is not after onset 30: clip ends 500 ms after the apex (frame 51; "
            "data.missing_offset_ms)") in msgs
    assert (t.loc["spNO.2_g_30", "start_frame"], t.loc["spNO.2_g_30", "end_frame"]) == (30, 51)
    assert pd.isna(t.loc["spNO.2_g_30", "offset"])  # the table's 0 is not kept as if it were true
    assert "[warn] train/spNO.2_g_50: apex 47 outside onset..offset (50..60): apex ignored, clip kept" in msgs
    # only the apex is out of range: onset and offset are kept (issue 9, point 8)
    row = t.loc["spNO.3_a_3"]
    assert pd.isna(row["apex"]) and (row["onset"], row["offset"], row["start_frame"], row["end_frame"]) == (3, 12, 3, 12)
    assert len([m for m in msgs if "spNO.3_a_3" in m]) == 1  # one line per row
    assert list(t["emotion"]) == ["others", "others", "disgust", "surprise", "anger", "others", "sadness",
                                  "happiness", "fear"]
    assert list(t["aus"][:3]) == ["R12", "R12", "4+L10"]  # the coded string, not the parsed copy


def test_casme3_names_survive_resorting_and_repeated_rows_are_reported(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    casme3_tree(a)
    shuffled = [CASME3_ROWS[i] for i in (8, 2, 0, 5, 7, 1, 4, 3, 6)]
    casme3_tree(b, shuffled + [CASME3_ROWS[0]])  # and one row listed twice
    ta, tb = load(a).table.set_index("sample"), load(b)
    cols = ["onset", "end_frame", "emotion"]
    kept = resolve_issues(tb).table.set_index("sample")
    assert kept.sort_index()[cols].equals(ta.sort_index()[cols])
    assert "repeats table row 4 (same subject, recording, onset and offset): not used twice" in " ".join(messages(tb))


def test_casme3_protocols_and_loso_ready_subjects(tmp_path):
    root = tmp_path / "CASME3"
    casme3_tree(root)
    four = resolve_issues(load(root, "data.protocol=4class"))
    assert four.name == "casme3-4class" and four.classes == ["negative", "others", "positive", "surprise"]
    assert list(four.table["emotion"]) == ["others", "others", "negative", "surprise", "negative", "others",
                                           "negative", "positive", "negative"]
    three = load(root, "data.protocol=3class")
    assert three.classes == ["negative", "positive", "surprise"]
    assert ("[skip] train/spNO.1_e_62: emotion 'others' is not a class of protocol 3class (negative, positive, "
            "surprise)") in messages(three)
    three = resolve_issues(three)
    assert list(three.table["label"]) == [0, 2, 0, 0, 1, 0]
    with pytest.raises(UserError, match=r"data.protocol=5class is not defined for CAS\(ME\)\^3"):
        load(root, "data.protocol=5class")


# ----------------------------------------------------------------------------- CASME II

def casme2_tree(root, cropped=False):
    """The original coding table: numeric subjects, blank columns, 'Estimated Emotion', '/' for a
    missing apex; frames sub01/EP02_01f/img46.jpg (cropped release: reg_img46.jpg)."""
    root.mkdir(parents=True)
    df = pd.DataFrame({
        "Subject": [1, 1, 2, 2, 3, 3],
        "Filename": ["EP02_01f", "EP03_02", "EP02_01f", "EP09_04", "EP01_12", "EP19_06f"],
        "Unnamed": [None] * 6,
        "OnsetFrame": [46, 131, 10, 20, 5, 30],
        "ApexFrame": [59, 139, "/", 28, 9, 38],
        "OffsetFrame": [86, 161, 40, 34, 25, 60],
        "Unnamed2": [None] * 6,
        "Action Units": ["12", "L2+12", "4+L10", "R4+R10", "1+2", "4+7+10"],
        "Estimated Emotion": ["happiness", "repression", "disgust", "others", "surprise", "fear"],
    })
    df.columns = ["Subject", "Filename", "", "OnsetFrame", "ApexFrame", "OffsetFrame", " ", "Action Units",
                  "Estimated Emotion"]
    df.to_excel(root / "CASME2-coding-20140508.xlsx", index=False)
    frames = root / ("Cropped" if cropped else "CASME2_RAW_selected")
    for r in df.itertuples(index=False):
        touch_frames(frames / f"sub{r[0]:02d}" / r[1], range(r[3], r[5] + 1),
                     "reg_img{}.jpg" if cropped else "img{}.jpg")
    return df


@pytest.mark.parametrize("cropped", [False, True])
def test_casme2_as_released(tmp_path, cropped):
    root = tmp_path / "CASME2"
    casme2_tree(root, cropped)
    ds = load(root)
    assert ds.name == "casme2-5class" and ds.classes == ["disgust", "happiness", "others", "repression", "surprise"]
    t = ds.table.set_index("sample")
    assert list(ds.table["sample"]) == ["sub01_EP02_01f", "sub01_EP03_02", "sub02_EP02_01f", "sub02_EP09_04",
                                        "sub03_EP01_12", "sub03_EP19_06f"]  # EP02_01f: two subjects
    assert t.loc["sub02_EP02_01f", "frames_dir"].endswith("sub02/EP02_01f")
    assert (t["fps"] == 200).all() and (t.loc["sub01_EP02_01f", ["start_frame", "end_frame"]] == [46, 86]).all()
    msgs = messages(ds)
    assert ("[warn] train/sub02_EP02_01f: no apex in the table: kept without one (the max-motion frame stands in)"
            in msgs)
    assert ("[skip] train/sub03_EP19_06f: emotion 'fear' is not a class of protocol 5class (disgust, happiness, "
            "others, repression, surprise)") in msgs
    kept = resolve_issues(ds)
    assert len(kept.table) == 5 and kept.table["subject"].tolist() == ["sub01", "sub01", "sub02", "sub02", "sub03"]
    three = resolve_issues(load(root, "data.protocol=3class"))
    assert three.classes == ["negative", "positive", "surprise"]
    assert list(three.table["emotion"]) == ["positive", "negative", "negative", "surprise", "negative"]
    every = resolve_issues(load(root, "data.protocol=all"))
    assert len(every.table) == 6 and "fear" in every.classes and "repression" in every.classes


def test_casme2_two_releases_under_one_root_are_named(tmp_path):
    root = tmp_path / "CASME2"
    casme2_tree(root)
    for d in (root / "CASME2_RAW_selected").rglob("EP03_02"):
        touch_frames(root / "Cropped" / d.parent.name / d.name, range(131, 162), "reg_img{}.jpg")
    ds = load(root)
    assert any("sub01_EP03_02: several frame folders" in m and "point --root at one release" in m for m in messages(ds))


# ----------------------------------------------------------------------------- SAMM

SAMM_COLUMNS = ["Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame", "Offset Frame", "Duration",
                "Type", "Action Units", "Notes", "Estimated Emotion"]
SAMM_ROWS = [
    [6, "006_1_2", 1, 5562, 5588, 5632, 71, "Micro - 1/2", "4+7", None, "Anger"],
    [6, "006_1_3", 1, 3912, 3948, 3988, 77, "Micro - 1/2", "4", "While blinking", "Anger"],
    [6, "006_3_4", 3, 639, 668, 702, 64, "Micro - 1/2", "15A+17", None, "Sadness"],
    [7, "007_6_1", 6, 1200, 1230, 1260, 61, "Micro - 1/2", "(R6 or R12)+R15", "Eye movement", "Happiness"],
    [7, "007_7_5", 7, 300, 320, 350, 51, "Micro - 1/2", "R14+17+soft focus", None, "Contempt"],
    [9, "009_2_1", 2, 100, 120, 140, 41, "Micro - 1/2", "A1B+A2C", "Large head movement", "Surprise"],
    [9, "009_3_2", 3, 400, 420, 440, 41, "Micro - 1/2", "ref(7B)+43C", None, "Other"],
]


def samm_tree(root, header_block=True):
    """The released xlsx: a block of title rows above the column names (or the plain form)."""
    root.mkdir(parents=True)
    body = [SAMM_COLUMNS] + SAMM_ROWS
    block = [["SAMM: Spontaneous Micro-Facial Movement Dataset"] + [None] * 10,
             ["FACS coding of the micro-movements"] + [None] * 10] + [[None] * 11] * 9 if header_block else []
    pd.DataFrame(block + body).to_excel(root / "SAMM_Micro_FACS_Codes_v2.xlsx", index=False, header=False)
    for r in SAMM_ROWS:
        touch_frames(root / f"{r[0]:03d}" / r[1], range(r[3] - 3, r[5] + 3), f"{r[0]:03d}_{{:05d}}.jpg")


@pytest.mark.parametrize("header_block", [True, False])
def test_samm_as_released(tmp_path, header_block):
    root = tmp_path / "SAMM"
    samm_tree(root, header_block)
    ds = load(root)
    assert ds.name == "samm-5class" and ds.classes == ["anger", "contempt", "happiness", "others", "surprise"]
    t = ds.table.set_index("sample")
    assert list(ds.table["sample"]) == [r[1] for r in SAMM_ROWS] and (t["fps"] == 200).all()
    assert t.loc["006_1_2", "frames_dir"].endswith("006/006_1_2") and t.loc["006_1_2", "subject"] == "006"
    assert (t.loc["006_1_2", ["start_frame", "apex", "end_frame"]] == [5562, 5588, 5632]).all()
    msgs = messages(ds)
    assert "[warn] train/007_7_5: AU string 'R14+17+soft focus': 'soft focus' not understood (skipped)" in msgs
    assert "[skip] train/006_3_4: emotion 'sadness' is not a class of protocol 5class" in " ".join(msgs)
    assert len([m for m in msgs if "[skip]" in m]) == 1  # 'Other' is SAMM's 'others'
    assert len(resolve_issues(ds).table) == 6
    every = resolve_issues(load(root, "data.protocol=all"))
    assert len(every.table) == 7 and every.classes == ["anger", "contempt", "happiness", "others", "sadness",
                                                       "surprise"]


# ----------------------------------------------------------------------------- composite

def test_composite_protocol_over_casme2_samm_and_casme3(tmp_path):
    root = tmp_path / "MEGC"
    casme2_tree(root / "CASME2")
    samm_tree(root / "SAMM")
    casme3_tree(root / "CASME3")
    ds = load(root)
    assert ds.name == "composite-3class" and ds.classes == ["negative", "positive", "surprise"]
    kept = resolve_issues(ds)
    t = kept.table
    assert set(t["dataset"]) == {"casme2", "samm", "casme3"}
    assert "casme2_sub01_EP02_01f" in set(t["sample"]) and "samm_006_1_2" in set(t["sample"])
    assert "casme3_spNO.1_e_130" in set(t["sample"]) and "casme2_sub01" in set(t["subject"])
    assert set(t.loc[t["dataset"] == "casme2", "fps"]) == {200} and set(t.loc[t["dataset"] == "casme3", "fps"]) == {30}
    # every 'others' row is reported and not used; everything else is used
    others = [m for m in messages(ds) if "'others' is not a class of protocol 3class" in m]
    assert len(others) == 1 + 1 + 3 and len(t) == 6 + 7 + 9 - 5
    code, out, err = check(root)
    assert code == 0, err
    assert "composite-3class" in out and "17 clips from 22 table rows (5 not used" in out
    assert "  casme2 train:" in out and "  samm train:" in out and "  casme3 train:" in out
    only_two = tmp_path / "MEGC2"
    only_two.mkdir()
    for k in ("CASME2", "SAMM"):
        (only_two / k).symlink_to(root / k)  # databases linked in, not copied
    assert set(resolve_issues(load(only_two)).table["dataset"]) == {"casme2", "samm"}
    with pytest.raises(UserError, match="composite protocol"):
        load(root, "data.protocol=5class")


def test_same_onset_twice_in_a_recording_is_told_apart_by_the_offset():
    from mer.databases import unique_names

    t = pd.DataFrame({"sample": ["s_e_10", "s_e_10", "s_e_40"], "offset": [20.0, 30.0, 50.0], "row": [0, 1, 2],
                      "split": "train"})
    issues = []
    assert list(unique_names(t, issues)["sample"]) == ["s_e_10-20", "s_e_10-30", "s_e_40"] and issues == []


def test_a_dfme_root_holding_another_database_is_still_dfme(tiny_dfme):
    casme2_tree(tiny_dfme / "extra" / "CASME2")
    ds = load(tiny_dfme)
    assert ds.name == "dfme" and len(ds.split("train")) == 4
    assert load(tiny_dfme / "extra" / "CASME2").name == "casme2-5class"


@pytest.mark.parametrize("kind", ["casme2", "casme3"])
def test_released_layouts_list_every_folder_once(tmp_path, kind):
    """Finding the table, the clip folders (indexed by a walk when they are not at
    <root>/<subject>/<clip>) and every clip's frames share one listing of each folder."""
    from mer.bench import ListingCounter

    root = tmp_path / kind
    casme2_tree(root) if kind == "casme2" else casme3_tree(root)
    with ListingCounter() as lc:
        ds = load(root)
    assert ds.table["frame_files"].map(bool).any()
    assert lc.counts and max(lc.counts.values()) == 1, lc.counts.most_common(3)
