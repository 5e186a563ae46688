"""Preprocessing on generated clips: motion where and when the generator put it, robustness, cache."""

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, small_config, work_config
from mer import cache as C
from mer.errors import UserError
from mer.features import DEFAULT_ROIS, mirror_permutation, grid_frames, roi_specs
from mer.preprocessing import Clip, Extractor, run

ROI = {r["name"]: i for i, r in enumerate(DEFAULT_ROIS)}
HEAD = 1.0  # the generator's default head drift and roll


def render(tmp_path, aus, fps=300, subject=1, emotion="happiness", **cfg):
    """One generated clip with exactly the given AUs; returns (Clip, truth)."""
    from mer.synth import single_clip_spec, write_clip

    sc = small_config(width=640, height=480, **cfg)
    spec = single_clip_spec(sc, emotion, subject_index=subject, fps=fps, aus=aus)
    d = tmp_path / f"{spec.filename}_{fps}"
    truth = write_clip(spec, sc, d, fps=fps)
    return Clip("train", spec.filename, str(d), float(fps)), truth


def peak_window(truth, au):
    """Where the generator put the AU's peak: its hold phase (activation >= 95% of the maximum)."""
    j = list(truth["au_ids"]).index(au)
    c = truth["au_curves"][:, j]
    t = truth["times_ms"][c >= 0.95 * c.max()]
    return t.min(), t.max()


def test_cache_round_trip(synth_cache):
    cfg, cdir = synth_cache
    m = C.read_manifest(cdir, "train")
    assert (m["status"] == "ok").all() and len(m) == 28
    row = m.iloc[0]
    cached = C.load_clip(cdir / row["file"])
    from mer.data import load_dataset

    ds = load_dataset(C.read_meta(cdir)["root"], cfg)
    r = ds.table[ds.table["sample"] == row["sample"]].iloc[0]
    fresh = Extractor(cfg).process(Clip("train", r["sample"], r["frames_dir"], r["fps"], apex=r["apex"]))
    for k in ("features", "times_ms", "frame_numbers", "apex_map", "apex_map_annotated", "landmarks"):
        np.testing.assert_array_equal(cached[k], fresh[k], err_msg=k)
    t = cached["times_ms"]
    assert cached["features"].shape == (len(t), 18, 4)
    assert np.allclose(np.diff(t), cfg["preprocess"]["grid_ms"], atol=2.5)  # the ms grid whatever the fps
    assert cached["apex_map"].shape == (3, 64, 64)
    assert int(cached["apex_annotated_frame"]) == int(r["apex"])


@pytest.mark.parametrize("au,roi", [(12, "mouth_54"), (2, "brow_right_25"), (9, "nose_35")])
def test_roi_motion_peaks_when_the_au_peaks_and_far_rois_stay_still(tmp_path, au, roi):
    # A clearly visible AU (1.5-2 px), head drift on, no blink (blinks are in the training data).
    clip, truth = render(tmp_path, [au], head_motion=HEAD, blink_prob=0.0, amplitude_px=(1.5, 2.0))
    res = Extractor(work_config(tmp_path)).process(clip)
    f, t = res["features"], res["times_ms"]
    mag = np.hypot(f[..., 0], f[..., 1])
    twin = mirror_permutation(roi_specs("default"))[ROI[roi]]
    r = max((ROI[roi], twin), key=lambda i: mag[:, i].max())
    lo, hi = peak_window(truth, au)
    assert lo - 10 - 1e-6 <= t[np.argmax(mag[:, r])] <= hi + 10 + 1e-6  # within one grid step of the peak
    far = {12: "brow_left_19", 2: "mouth_57", 9: "brow_right_24"}[au]
    assert mag[:, ROI[far]].max() < 0.35 * mag[:, r].max()  # head motion removed, no leakage
    assert np.abs(res["head"]).max() > 0.1  # the head did move, and was measured


def test_same_clip_at_200_and_500_fps_agrees_on_the_ms_grid(tmp_path):
    cfg = work_config(tmp_path)
    curves = []
    for fps in (200, 500):
        clip, truth = render(tmp_path, [12, 6], fps=fps, subject=2, amplitude_px=(1.5, 2.0))
        res = Extractor(cfg).process(clip)
        curves.append((res["times_ms"], np.hypot(res["features"][..., 0], res["features"][..., 1])))
    (t2, m2), (t5, m5) = curves
    n = min(len(t2), len(t5))
    assert np.allclose(t2[:n], t5[:n], atol=2.5)
    for r in (ROI["mouth_48"], ROI["mouth_54"]):
        a, b = m2[:n, r], m5[:n, r]
        assert np.corrcoef(a, b)[0, 1] > 0.9
        rise_a, rise_b = np.argmax(a >= 0.5 * a.max()), np.argmax(b >= 0.5 * b.max())
        assert abs(int(rise_a) - int(rise_b)) <= 1  # the motion starts at the same ms
        assert abs(a.max() - b.max()) < 0.25 * max(a.max(), b.max())


def test_a_jpeg_is_complete_with_its_end_marker_even_padded():
    from mer.frames import jpeg_is_complete

    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (120, 160), np.uint8), (0, 0), 2)
    data = cv2.imencode(".jpg", img)[1].ravel()
    assert jpeg_is_complete(data) and jpeg_is_complete(np.concatenate([data, np.zeros(30, np.uint8)]))
    assert not any(jpeg_is_complete(data[:n]) for n in range(len(data) // 10, len(data) - 1, 7))
    trailer = np.frombuffer(b"\x00\x00MotionPhoto" * 300, np.uint8)  # data after the image (some cameras)
    assert jpeg_is_complete(np.concatenate([data, trailer]))
    thumb = cv2.imencode(".jpg", img[::4, ::4])[1].ravel().tobytes()  # its own end marker, in the header
    app1 = b"\xff\xe1" + (len(thumb) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + thumb
    with_thumb = np.frombuffer(data[:2].tobytes() + app1 + data[2:].tobytes(), np.uint8)
    assert cv2.imdecode(with_thumb, cv2.IMREAD_GRAYSCALE).shape == img.shape and jpeg_is_complete(with_thumb)
    assert not any(jpeg_is_complete(with_thumb[:n]) for n in range(len(app1) + 200, len(with_thumb) - 1, 97))


def test_frames_are_decoded_by_content_whatever_their_extension(tmp_path):
    """A PNG saved as .jpg (a careless export) still reads, whole even where a JPEG would be
    decoded reduced (its size need not divide: libjpeg's ceil(size / 2) is not a resize's)."""
    from mer.frames import FolderFrames

    img = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 255, (121, 161), np.uint8), (0, 0), 2)
    cv2.imwrite(str(tmp_path / "00001.png"), img)
    (tmp_path / "00001.png").rename(tmp_path / "00001.jpg")
    frames = FolderFrames.of(tmp_path)
    np.testing.assert_array_equal(frames.read(0), img)
    np.testing.assert_array_equal(frames.read(0, 2), img)  # only libjpeg decodes reduced: the rest comes whole
    (tmp_path / "00002.jpg").write_bytes(b"")  # an empty file: unreadable, not an exception
    assert FolderFrames.of(tmp_path).read(1) is None


@pytest.mark.parametrize("damage", ["half size", "larger", "jpeg cut short", "black", "white"])
def test_a_damaged_frame_is_skipped_and_named(tmp_path, caplog, damage):
    """A stray frame of another size in a clip (re-saved, or from another export), a JPEG cut short
    (an interrupted copy, which libjpeg decodes with its missing part grey) or a dropped (black or
    white) frame is skipped with a warning naming it, instead of faking a burst of motion that also
    knocks the head fit off for the steps after it."""
    from mer.data import frame_number

    clip, _ = render(tmp_path, [12], fps=200, frame_format="jpg" if damage.startswith("jpeg") else "png")
    ex = Extractor(work_config(tmp_path))
    clean = ex.process(clip)
    number = int(clean["frame_numbers"][len(clean["frame_numbers"]) // 2])
    path = next(p for p in Path(clip.frames_dir).iterdir() if frame_number(p) == number)
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    if damage == "jpeg cut short":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 6 // 10])
        said = f"unreadable frame {path.name} (undecodable or cut short: skipped; replace it to use it)"
    elif damage in ("black", "white"):  # a dropped frame
        cv2.imwrite(str(path), np.full_like(img, 0 if damage == "black" else 255))
        said = f"frame {path.name} is blank (almost no contrast in the face crop: a dropped frame?): skipped"
    else:
        scale = 0.5 if damage == "half size" else 1.25
        cv2.imwrite(str(path), cv2.resize(img, (round(w * scale), round(h * scale))))
        said = (f"frame {path.name} is {round(w * scale)}x{round(h * scale)}, unlike the clip's first frame ({w}x{h}): "
                "skipped (replace it to use it)")
    with caplog.at_level("WARNING"):
        res = ex.process(clip)
    assert int(res["unreadable"]) == 1 and number not in res["frame_numbers"]
    assert said in caplog.text
    keep = np.isin(clean["frame_numbers"], res["frame_numbers"])
    assert keep.sum() == len(clean["frame_numbers"]) - 1
    np.testing.assert_allclose(res["features"], clean["features"][keep], atol=0.01)  # the other steps as before


def test_match_gain_takes_a_flicker_out_of_the_motion(tmp_path):
    """A frame 10% darker than the others (a flicker trough, an exposure step) reads as motion in
    the ROIs; with preprocess.match_gain its crop is brought to the reference's mean grey level
    first, and the step reads (nearly) what it reads unflickered. (A brighter frame whose
    highlights clip at 255 cannot be undone that way.)"""
    from mer.data import frame_number

    clip, _ = render(tmp_path, [12], fps=200)
    paths = {frame_number(p): p for p in Path(clip.frames_dir).iterdir()}
    runs = {}
    for gain in (False, True):
        ex = Extractor(work_config(tmp_path, **{"preprocess.match_gain": gain}))
        clean = ex.process(clip)
        number = int(clean["frame_numbers"][len(clean["frame_numbers"]) // 2])
        original = paths[number].read_bytes()
        img = cv2.imread(str(paths[number]))
        cv2.imwrite(str(paths[number]), (img * 0.9).astype(np.uint8))
        flickered = ex.process(clip)
        paths[number].write_bytes(original)
        step = list(clean["frame_numbers"]).index(number)
        runs[gain] = np.abs(flickered["features"][step] - clean["features"][step])[:, :2].max()  # u, v
    assert runs[False] > 0.3 and runs[True] < 0.5 * runs[False], runs


def test_a_jpeg_twice_the_size_is_not_taken_for_a_full_size_frame(tmp_path, caplog):
    """Frames decoded at 1/2 (the crop shrinks the face 2x or more): a stray JPEG of twice the size
    comes back at the clip's full size and must still be refused; a first frame of another size
    fails the clip with a reason that says so."""
    from mer.data import frame_number
    from mer.preprocessing import ClipError

    clip, _ = render(tmp_path, [12], fps=200, frame_format="jpg")
    paths = sorted(Path(clip.frames_dir).iterdir(), key=frame_number)
    for p in paths:  # 1280x960: a big face, so frames are decoded at 1/2
        cv2.imwrite(str(p), cv2.resize(cv2.imread(str(p)), (1280, 960)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    ex = Extractor(work_config(tmp_path))
    clean = ex.process(clip)
    number = int(clean["frame_numbers"][len(clean["frame_numbers"]) // 2])
    path = next(p for p in paths if frame_number(p) == number)
    cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (2560, 1920)))
    with caplog.at_level("WARNING"):
        res = ex.process(clip)
    assert int(res["unreadable"]) == 1 and number not in res["frame_numbers"]
    assert f"frame {path.name} is 1280x960 at 1/2 scale, unlike the clip's first frame (1280x960)" in caplog.text
    cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (1280, 960)))
    cv2.imwrite(str(paths[0]), cv2.resize(cv2.imread(str(paths[0])), (2560, 1920)))  # now the first frame is odd
    with pytest.raises(ClipError, match="of another size than the first frame: if the first frame is the odd one"):
        ex.process(clip)


def test_a_clip_cut_at_max_ms_is_a_warning_and_a_manifest_column(tmp_path, caplog):
    clip, truth = render(tmp_path, [12], fps=200)
    cfg = work_config(tmp_path, **{"preprocess.max_ms": 150.0})
    with caplog.at_level("WARNING"):
        res = Extractor(cfg).process(clip)
    full = (len(truth["times_ms"]) - 1) * 1000.0 / 200
    assert float(res["truncated_from_ms"]) == pytest.approx(full) and res["times_ms"][-1] <= 150
    assert "ms long, truncated to preprocess.max_ms=150" in caplog.text
    assert "truncated_from_ms" in C.MANIFEST_COLUMNS
    assert np.isnan(Extractor(work_config(tmp_path)).process(clip)["truncated_from_ms"])  # not cut: empty


def test_grid_uses_frame_numbers_so_gaps_keep_time():
    numbers = np.array([1, 2, 3, 4, 8, 9, 10, 11, 12, 13], float)  # frames 5-7 missing
    pos, times = grid_frames(numbers, 100.0, 20.0, 1e9)
    assert list(times) == [0, 20, 30, 70, 80, 100, 120]  # nearest available frame to each 20 ms step


def test_mirror_permutation_pairs_left_and_right():
    perm = mirror_permutation(roi_specs("default"))
    names = [r["name"] for r in DEFAULT_ROIS]
    pairs = {names[i]: names[j] for i, j in enumerate(perm)}
    assert pairs["brow_left_18"] == "brow_right_25" and pairs["mouth_48"] == "mouth_54"
    assert pairs["nose_31"] == "nose_35" and pairs["mouth_51"] == "mouth_51" and pairs["eyelid_left"] == "eyelid_right"
    assert (perm[perm] == np.arange(len(perm))).all()


@pytest.mark.parametrize("key,value", [("farneback_iters", 0), ("farneback_levels", 11), ("farneback_iters", 2.5),
                                       ("farneback_iters", True)])
def test_bad_farneback_settings_are_refused_by_name(tmp_path, key, value):
    from mer.flow import make_flow

    for method in ("farneback", "dis"):  # whatever the flow, a bad value is an error
        with pytest.raises(ValueError, match=f"preprocess.{key} must be an integer from 1 to 10"):
            make_flow(method, **{{"farneback_iters": "iterations", "farneback_levels": "levels"}[key]: value})


def test_farneback_iterations_change_the_flow():
    """Fewer iterations: a flow close to the default's on a sub-pixel shift, not the same one."""
    from mer.flow import make_flow

    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur((rng.random((96, 96)) * 255).astype(np.uint8), (0, 0), 2)
    b = cv2.warpAffine(a, np.float32([[1, 0, 0.4], [0, 1, -0.3]]), (96, 96))
    full, fewer = make_flow("farneback")(a, b), make_flow("farneback", iterations=1)(a, b)
    inner = (slice(20, 76), slice(20, 76))
    for flow in (full, fewer):
        np.testing.assert_allclose(np.median(flow[inner].reshape(-1, 2), 0), [0.4, -0.3], atol=0.05)
    assert np.abs(full - fewer).max() > 1e-4


def test_changing_a_setting_changes_the_cache_key(tmp_path):
    base = work_config(tmp_path)
    key = C.cache_key(base)
    for k, v in [("flow", "dis"), ("grid_ms", 10.0), ("top_frac", 0.3), ("crop_size", 192),
                 ("rois", [{"name": "a", "landmarks": [48]}, {"name": "b", "landmarks": [54]}]), ("flow_blur", 0.0),
                 ("farneback_iters", 3), ("farneback_levels", 1), ("match_gain", True)]:
        cfg = work_config(tmp_path)
        cfg["preprocess"][k] = v
        assert C.cache_key(cfg) != key, k
    cfg = work_config(tmp_path / "elsewhere")
    assert C.cache_key(cfg) == key  # where the cache lives is not a setting of the tensors
    # settings added later, at the values the code used before they existed: a cache made then keeps its key
    earlier = {"flow_blur": 0.0, "farneback_iters": 3, "farneback_levels": 3, "match_gain": False}
    before = C.cache_key(work_config(tmp_path, **{f"preprocess.{k}": v for k, v in earlier.items()}))
    for k in earlier:
        del cfg["preprocess"][k]
    assert C.cache_key(cfg) == before
    dis = C.cache_key(work_config(tmp_path, **{"preprocess.flow": "dis"}))  # Farneback's settings: not DIS's
    assert C.cache_key(work_config(tmp_path, **{"preprocess.flow": "dis", "preprocess.farneback_iters": 1})) == dis
    # every cache keeps the spotted apex map, whatever apex_frame the main map uses
    keys = set()
    for frame in ("blink_free", "max_motion"):
        for ms in (200.0, 300.0):
            cfg = work_config(tmp_path, **{"preprocess.apex_frame": frame, "preprocess.apex_spot_ms": ms})
            keys.add(C.cache_key(cfg))
    assert len(keys) == 4


def _small_copy(src: Path, dst: Path, samples: dict[str, list[str]]) -> Path:
    """A copy of the generated set holding only some clips (tables filtered)."""
    from mer.synth import write_xlsx

    dst.mkdir(parents=True)
    for split, table, folder in [("train", "train.xlsx", "train_data"), ("test_A", "test_A.xlsx", "test_data_A"),
                                 ("test_B", "test_B.xlsx", "test_data_B/test_data_B")]:
        t = pd.read_excel(src / table, dtype={"Filename": str})
        t = t[t["Filename"].isin(samples.get(split, []))]
        write_xlsx(t, dst / table)
        for s in t["Filename"]:
            shutil.copytree(src / folder / s, dst / folder / s)
    return dst


def _names(root: Path, table: str, n: int) -> list[str]:
    return list(pd.read_excel(root / table, dtype={"Filename": str})["Filename"][:n])


def test_bad_clips_end_as_specified(synth_root, tmp_path):
    train, test = _names(synth_root, "train.xlsx", 4), _names(synth_root, "test_B.xlsx", 2)
    root = _small_copy(synth_root, tmp_path / "D", {"train": train, "test_B": test})
    for f in sorted((root / "train_data" / train[0]).iterdir())[10:16]:  # at least one on the grid
        f.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for f in sorted((root / "train_data" / train[1]).iterdir())[20:40]:
        f.unlink()  # missing frames in the middle
    blank = np.full((300, 400, 3), 90, np.uint8)
    for d in (root / "train_data" / train[2], root / "test_data_B" / "test_data_B" / test[0]):
        for f in d.iterdir():
            cv2.imwrite(str(f), blank)  # no face anywhere
    cfg = work_config(tmp_path)
    cdir = run(root, cfg)
    m = pd.concat([C.read_manifest(cdir, s) for s in ("train", "test_B")]).set_index("sample")
    assert m.loc[train[0], "status"] == "ok" and m.loc[train[0], "unreadable"] >= 1
    assert m.loc[train[1], "status"] == "ok"
    z = C.load_clip(cdir / m.loc[train[1], "file"])
    assert z["times_ms"][-1] > 0 and not (np.diff(z["frame_numbers"]) == 0).any()
    assert m.loc[train[2], "status"] == "failed" and "no face found" in m.loc[train[2], "reason"]
    assert m.loc[test[0], "status"] == "fallback" and "centred box" in m.loc[test[0], "reason"]
    fb = C.load_clip(cdir / m.loc[test[0], "file"])
    assert fb["features"].shape[1:] == (18, 4) and np.isfinite(fb["features"]).all()
    assert m.loc[test[1], "status"] == "ok"
    from mer.training import load_clips

    assert train[2] not in load_clips(cdir, "train").samples  # a failed train clip is left out
    assert load_clips(cdir, "test_B", require_all=True).samples == test  # the fallback one still predicts


def _npz_arrays(cdir: Path) -> dict:
    out = {}
    for p in sorted(cdir.glob("*/clips/*.npz")):
        z = C.load_clip(p)
        out[p.relative_to(cdir).as_posix()] = {k: v for k, v in z.items() if k != "seconds"}
    return out


def test_kill_9_then_rerun_equals_an_uninterrupted_run(synth_root, tmp_path):
    root = _small_copy(synth_root, tmp_path / "D", {"train": _names(synth_root, "train.xlsx", 10)})
    cmd = [sys.executable, str(ROOT / "preprocess.py"), "--root", str(root), "--workers", "1"]
    killed = cmd + ["--set", f"preprocess.cache_dir={tmp_path / 'a'}"]
    proc = subprocess.Popen(killed, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "a").glob("*/*/train/clips/*.npz"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = list((tmp_path / "a").glob("*/*/train/clips/*"))
    assert 3 <= len(partial) < 10, "the run should have been killed mid-way"
    subprocess.run(killed, cwd=ROOT, check=True, capture_output=True)
    subprocess.run(cmd + ["--set", f"preprocess.cache_dir={tmp_path / 'b'}"], cwd=ROOT, check=True,
                   capture_output=True)
    a, b = (next((tmp_path / x).glob("*/*")) for x in "ab")
    assert not list(a.rglob("*.tmp"))
    arrays_a, arrays_b = _npz_arrays(a), _npz_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b) and len(arrays_a) == 10
    for name in arrays_a:
        for k, v in arrays_a[name].items():
            np.testing.assert_array_equal(v, arrays_b[name][k], err_msg=f"{name}:{k}")


def test_preprocess_script_summary_inspect_and_fatal_errors(synth_root, tmp_path):
    root = _small_copy(synth_root, tmp_path / "D", {"train": _names(synth_root, "train.xlsx", 2),
                                                   "test_B": _names(synth_root, "test_B.xlsx", 1)})
    base = [sys.executable, str(ROOT / "preprocess.py"), "--root", str(root),
            "--set", f"preprocess.cache_dir={tmp_path / 'c'}"]
    out = subprocess.run(base, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == ""
    assert "train: ok 2" in out.stderr and "test_B: ok 1" in out.stderr and "frames/s" in out.stderr
    png = tmp_path / "inspect.png"
    sample = _names(synth_root, "train.xlsx", 1)[0]
    out = subprocess.run(base + ["--inspect", sample, "--out", str(png)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and png.stat().st_size > 20_000
    shutil.rmtree(next((root / "test_data_B").rglob(_names(synth_root, "test_B.xlsx", 1)[0])))
    out = subprocess.run(base + ["--force"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "[fatal] test_B/" in out.stderr and "frame folder not found" in out.stderr
    assert "error: 1 fatal problem(s)" in out.stderr and "preprocess:" not in out.stderr  # stopped before work


def test_fan_without_cached_weights_names_the_files_and_folder(tmp_path, monkeypatch):
    import torch

    from mer.errors import UserError
    from mer.face import make_landmarker

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"2DFAN4-11f355bf06.pth.tar, s3fd-619a316812.pth; place them in .*hub/checkpoints"):
        make_landmarker("fan")


def test_shards_split_the_clips_between_jobs():
    from mer.preprocessing import parse_shard
    from mer.errors import UserError

    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_shard_jobs_together_cache_every_clip_once(synth_root, tmp_path):
    root = _small_copy(synth_root, tmp_path / "D", {"train": _names(synth_root, "train.xlsx", 5)})
    cfg = work_config(tmp_path)
    cdir = run(root, cfg, shard="0/2")
    assert len(list(cdir.glob("train/clips/*.npz"))) == 3  # clips 0, 2, 4
    assert (C.read_manifest(cdir, "train")["status"] == "pending").sum() == 2
    run(root, cfg, shard="1/2")
    m = C.read_manifest(cdir, "train")
    assert len(m) == 5 and (m["status"] == "ok").all()


# ----------------------------------------------------------------------------- anti-aliased crop

def test_cropper_low_passes_what_it_shrinks():
    """Shrinking a noisy frame 2.5x into the flow crop must average the noise (area reduction),
    not pick every 2.5th pixel: the crop's noise falls by ~2x instead of staying as strong."""
    from mer.face import Cropper

    rng = np.random.default_rng(0)
    frame = (128 + 20 * rng.standard_normal((768, 1024))).clip(0, 255).astype(np.uint8)
    m = np.array([[1 / 2.5, 0, -100], [0, 1 / 2.5, -60]])  # a 480 px face region -> 192 px
    crop = Cropper(m, 192, frame.shape)
    assert crop.factor == 2
    out = crop(frame, frame.shape).astype(float)
    bilinear = cv2.warpAffine(frame, m, (192, 192), flags=cv2.INTER_LINEAR).astype(float)
    assert out.std() < 0.6 * bilinear.std()
    # JPEG frames are decoded at half size by libjpeg: the same crop, on the same pixel grid
    ok, jpg = cv2.imencode(".jpg", cv2.GaussianBlur(frame, (0, 0), 3), [cv2.IMWRITE_JPEG_QUALITY, 95])
    full = cv2.imdecode(jpg, cv2.IMREAD_GRAYSCALE)
    half = cv2.imdecode(jpg, cv2.IMREAD_REDUCED_GRAYSCALE_2)
    a, b = crop(full, full.shape).astype(float), crop(half, full.shape).astype(float)
    assert np.abs(a - b)[8:-8, 8:-8].mean() < 1.0


def test_big_faces_are_measured_without_aliased_noise(tmp_path):
    """The same AU on a face 2.5x larger than the flow crop: with sensor noise, the anti-aliased
    crop measures it within 10% of the noise-free clip (bilinear decimation: 14% low). Filmed with
    the face at the crop's own size (no reduction, so no low-pass), the same clip reads 15% lower;
    with preprocess.flow_blur 0.6 (the same low-pass on every crop) both agree within 10%."""
    from mer.face import Cropper
    from mer.synth import SynthConfig, single_clip_spec, write_clip

    def peak(noise: float, factor: int | None = None, face: float = 240.0, frame: tuple = (1024, 768),
             blur: float = 0.0) -> float:
        cfg = SynthConfig(subjects=2, split_subjects=(2, 0, 0), width=frame[0], height=frame[1], face_width=face,
                          face_spread=0.0, head_motion=0.0, blink_prob=0.0, jpeg_quality=100, skin_texture=4.0,
                          noise=noise, noise_sigma=(2.5, 2.5), flicker_pct=(0, 0), amplitude_px=(1.0, 1.0),
                          me_ms=(300.0, 300.0), neutral_ms=(60.0, 60.0))
        spec = single_clip_spec(cfg, "happiness", subject_index=1, fps=200, aus=[12])
        d = tmp_path / f"n{noise}_{face}"
        if not d.is_dir():
            write_clip(spec, cfg, d)
        ex = Extractor(work_config(tmp_path, **{"preprocess.flow_blur": blur}))
        if factor is not None:  # force the old bilinear decimation
            init = Cropper.__init__

            def forced(self, *a, **k):
                init(self, *a, **k)
                self.factor = factor
            Cropper.__init__ = forced
        try:
            res = ex.process(Clip("train", "x", str(d), 200.0))
            f = res["features"]
            sizes.append(np.hypot(*res["crop_matrix"][0, :2]))  # crop px per frame px
        finally:
            if factor is not None:
                Cropper.__init__ = init
        return float(np.hypot(f[..., 0], f[..., 1])[:, [ROI["mouth_48"], ROI["mouth_54"]]].max(0).mean())

    sizes = []
    clean, noisy = peak(0.0), peak(1.0)
    assert abs(noisy / clean - 1) < 0.10
    assert peak(1.0, factor=1) / clean < noisy / clean  # bilinear decimation reads less of the motion
    small = peak(0.0, face=270.0, frame=(400, 300))  # 169 px: the size it has in the crop
    assert 1 / sizes[0] > 2.2 and 0.9 < sizes[-1] < 1.1, sizes  # a 2.3x reduction and none
    assert 0.1 < 1 - small / clean < 0.20  # no low-pass at 1x: reads less
    clean, noisy, small = peak(0.0, blur=0.6), peak(1.0, blur=0.6), peak(0.0, face=270.0, frame=(400, 300), blur=0.6)
    assert abs(noisy / clean - 1) < 0.10 and abs(small / clean - 1) < 0.10


def test_roi_pooling_on_roi_pixels_equals_the_whole_field():
    """Head motion removed and strain computed only where ROIs pool give the same features as
    removing the head field from, and differentiating, the whole crop (to float precision)."""
    from mer.features import Motion, RoiPooler, roi_boxes, roi_specs
    from mer.flow import optical_strain
    from mer.face import template_landmarks

    rng = np.random.default_rng(3)
    size = 192
    flow = cv2.GaussianBlur(rng.standard_normal((size, size, 2)).astype(np.float32), (0, 0), 3) * 5
    lm = template_landmarks(size, 4.6, 0.38)
    layout = roi_boxes(lm, roi_specs("default"), size, 0.05, [28, 29, 30])
    motion = Motion(np.array([[0.01, -0.02], [0.02, 0.01]], np.float32), np.array([0.3, -0.2], np.float32),
                    np.zeros(3, np.float32))
    pool = RoiPooler(layout.boxes, size, 0.25, ("u", "v", "mag", "strain"))
    fast = pool(flow, motion)
    free = flow - motion.field(size)
    strain = optical_strain(free)
    slow = np.zeros_like(fast)
    for r, (x0, y0, x1, y1) in enumerate(layout.boxes):
        u, v = free[y0:y1, x0:x1, 0].ravel(), free[y0:y1, x0:x1, 1].ravel()
        mag = np.hypot(u, v)
        k = pool.k[r]
        top = np.argsort(mag)[-k:]
        slow[r] = [u[top].mean(), v[top].mean(), mag[top].mean(), np.sort(strain[y0:y1, x0:x1].ravel())[-k:].mean()]
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    # a homography (a turning head): strain less the head's Jacobian at each ROI's centre
    turn = Motion(motion.lin, motion.t, np.zeros(3, np.float32), np.array([0.02, -0.01], np.float32),
                  np.array([96.0, 96.0], np.float32), 40.0)
    fast = RoiPooler(layout.boxes, size, 0.25, ("strain",))(flow, turn)[:, 0]
    want = [np.sort(optical_strain(flow, turn.jacobian((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2))[y0:y1, x0:x1].ravel())
            [-k:].mean() for (x0, y0, x1, y1), k in zip(layout.boxes, pool.k)]
    np.testing.assert_allclose(fast, want, rtol=1e-4, atol=1e-5)
    # boxes on the crop's edges and corners: one-sided differences there, as np.gradient takes them
    edges = np.array([[0, 0, 12, 9], [size - 7, 40, size, 60], [50, size - 5, 80, size]])
    pool = RoiPooler(edges, size, 1.0, ("strain",))
    whole = optical_strain(flow)
    want = [whole[y0:y1, x0:x1].mean() for x0, y0, x1, y1 in edges]
    np.testing.assert_allclose(pool(flow)[:, 0], want, rtol=1e-4, atol=1e-6)


def test_motion_in_complex_form_equals_its_components():
    """Motion.at_complex (what ROI pooling subtracts) is Motion.at as u + iv for every head model:
    a similarity, a general affine map, a homography in normalised coordinates, the nose's translation."""
    from mer.features import Motion

    rng = np.random.default_rng(5)
    xs, ys = rng.uniform(0, 192, 500).astype(np.float32), rng.uniform(0, 192, 500).astype(np.float32)
    q = (xs + 1j * ys).astype(np.complex64)
    summary = np.zeros(3, np.float32)
    motions = [Motion(np.array([[0.01, -0.02], [0.02, 0.01]], np.float32), np.array([0.3, -0.2], np.float32), summary),
               Motion(np.array([[0.015, 0.004], [-0.01, -0.02]], np.float32), np.array([-0.5, 0.7], np.float32), summary),
               Motion(np.array([[0.99, 0.01], [-0.02, 1.01]], np.float32), np.array([0.1, 0.2], np.float32), summary,
                      np.array([0.02, -0.01], np.float32), np.array([96.0, 90.0], np.float32), 40.0),
               Motion(np.zeros((2, 2), np.float32), np.array([1.5, -0.25], np.float32), summary)]
    for m in motions:
        u, v = m.at(xs, ys)
        z = m.at_complex(q)
        assert z.dtype == np.complex64 and z.shape == q.shape
        np.testing.assert_allclose(z.real, u, atol=2e-5)
        np.testing.assert_allclose(z.imag, v, atol=2e-5)


def test_robust_similarity_fit_ignores_local_motion():
    """Translation + roll + zoom of the whole face recovered while 30% of the points move on their own."""
    from mer.features import fit_similarity

    rng = np.random.default_rng(4)
    pts = rng.uniform(20, 170, (300, 2))
    a, b, tx, ty = 0.004, 0.01, 0.8, -0.5  # 0.4% zoom, ~0.6 deg roll
    d = np.stack([a * pts[:, 0] - b * pts[:, 1] + tx, b * pts[:, 0] + a * pts[:, 1] + ty], 1)
    d += rng.normal(0, 0.05, d.shape)
    local = rng.random(300) < 0.3
    d[local] += rng.normal(0, 1.5, (local.sum(), 2))  # AUs and blinks
    p = fit_similarity(pts, d)
    assert np.all(np.abs(p - [a, b, tx, ty]) < [2e-3, 2e-3, 0.1, 0.1]), p
    warm = fit_similarity(pts, d, init=p, iters=1)  # warm start: already there
    np.testing.assert_allclose(warm, p, atol=1e-3)
    # no points, or a flow with a NaN in it: the start is kept, never NaN parameters
    np.testing.assert_array_equal(fit_similarity(np.zeros((0, 2)), np.zeros((0, 2))), np.zeros(4))
    d[7] = np.nan
    np.testing.assert_array_equal(fit_similarity(pts, d, init=p), p)


def test_similarity_fit_in_closed_form_is_the_general_irls():
    """fit_similarity's complex closed-form steps give _irls's fit of the same model (4 x 4 systems)."""
    from mer.features import _irls, fit_similarity

    rng = np.random.default_rng(5)
    pts = rng.uniform(20, 170, (300, 2))
    x, y = pts[:, 0], pts[:, 1]
    one, zero = np.ones(300), np.zeros(300)
    A = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    for p_true, outliers in (([0.004, 0.01, 0.8, -0.5], 0.3), ([-0.01, 0.002, -2.0, 1.0], 0.45)):
        d = (A @ np.asarray(p_true)).reshape(2, -1).T + rng.normal(0, 0.05, (300, 2))
        local = rng.random(300) < outliers
        d[local] += rng.normal(0, 1.5, (local.sum(), 2))
        for init, iters in ((None, 6), (np.asarray(p_true) * 0.8, 6), (None, 2)):
            general = _irls(A, np.concatenate([d[:, 0], d[:, 1]]), 300, init, iters)
            np.testing.assert_allclose(fit_similarity(pts, d, init, iters), general, rtol=1e-9, atol=1e-12)


def test_fast_median_is_numpys():
    from mer.features import _median

    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 10, 299, 300):
        x = rng.standard_normal(n)
        assert _median(x) == pytest.approx(float(np.median(x)), abs=1e-12)


def _kill_self_on(job):
    """A job function for run_jobs: dies by SIGKILL on job 'die', as an OOM-killed worker would."""
    if job == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return job * 2


def test_run_jobs_survives_a_killed_worker_and_finishes_the_rest():
    from mer.workers import Lost, run_jobs

    jobs = ["a", "b", "die", "c", "d", "e"]
    out = dict(run_jobs(_kill_self_on, jobs, workers=2))
    assert sorted(out) == sorted(jobs)
    assert isinstance(out["die"], Lost) and "SIGKILL" in out["die"].reason
    assert all(out[j] == j * 2 for j in jobs if j != "die")


def _broken_init():
    raise OSError("no GPU memory left for the landmark model")


def _nothing(job):
    return None


def test_run_jobs_reports_a_worker_that_cannot_start_and_answers_of_none():
    from mer.workers import WorkerStartError, run_jobs

    with pytest.raises(WorkerStartError, match="no GPU memory left"):
        list(run_jobs(_nothing, [1, 2, 3], 2, initializer=_broken_init))
    assert dict(run_jobs(_nothing, [1, 2, 3], 2)) == {1: None, 2: None, 3: None}


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_a_worker_killed_mid_run_costs_only_its_clip_and_a_rerun_retries_it(synth_root, tmp_path):
    names = _names(synth_root, "train.xlsx", 8)
    root = _small_copy(synth_root, tmp_path / "D", {"train": names})
    cmd = [sys.executable, str(ROOT / "preprocess.py"), "--root", str(root), "--workers", "2",
           "--set", f"preprocess.cache_dir={tmp_path / 'c'}"]
    # -v: the parent logs "worker <pid> started <clip>" once the worker has taken the clip; killing
    # that pid right then hits it mid-clip (not between saving a clip and saying so, which is no loss)
    proc = subprocess.Popen(cmd + ["-v"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, started = [], queue.Queue()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            hit = re.search(r"worker (\d+) started train/(\S+)", line)
            if hit:
                started.put(int(hit.group(1)))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    victim, seen = None, 0
    while victim is None:
        try:
            pid = started.get(timeout=120)
        except queue.Empty:
            break
        seen += 1
        if seen == 3:  # one clip in: past the workers' start-up
            victim = pid
            os.kill(victim, signal.SIGKILL)  # as the out-of-memory killer would
    assert victim is not None, "the workers never showed up"
    try:
        proc.wait(timeout=180)  # must end, not hang
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("preprocess.py hung after a worker was killed")
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 0, err
    cdir = next((tmp_path / "c").glob("*/*"))
    m = C.read_manifest(cdir, "train")
    failed = m[m["status"] == "failed"]
    assert len(m) == 8 and len(failed) == 1 and (m["status"] == "ok").sum() == 7
    assert "killed by SIGKILL" in failed["reason"].iloc[0] and "SIGKILL" in err
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "7 of 8 clips already cached" in again.stderr  # the failed one is retried
    assert (C.read_manifest(cdir, "train")["status"] == "ok").all()


def test_a_face_entering_late_is_found_and_motion_measured_from_there(synth_root, tmp_path):
    train, test = _names(synth_root, "train.xlsx", 1), _names(synth_root, "test_B.xlsx", 1)
    root = _small_copy(synth_root, tmp_path / "D", {"train": train, "test_B": test})
    folders = [root / "train_data" / train[0], root / "test_data_B" / "test_data_B" / test[0]]
    entered = []
    for d in folders:
        files = sorted(d.iterdir())
        blank = np.full(cv2.imread(str(files[0])).shape, 90, np.uint8)
        k = int(len(files) * 0.55)  # the face appears after more than half of the clip
        for f in files[:k]:
            cv2.imwrite(str(f), blank)
        entered.append(int(files[k].stem))
    cfg = work_config(tmp_path)
    cdir = run(root, cfg)
    for split, name, first in (("train", train[0], entered[0]), ("test_B", test[0], entered[1])):
        r = C.read_manifest(cdir, split).set_index("sample").loc[name]
        assert r["status"] == "ok", r["reason"]  # not a failed train clip, not a centred fallback
        assert int(r["detect_frame"]) == first  # bisected to the first frame with the face
        z = C.load_clip(cdir / r["file"])
        assert int(z["frame_numbers"][0]) == first and z["times_ms"][0] == 0
    cfg_none = work_config(tmp_path / "n", **{"preprocess.detect_sparse": 0})
    m = C.read_manifest(run(root, cfg_none), "train")
    assert m["status"].iloc[0] == "failed" and "no face found" in m["reason"].iloc[0]


def test_of_several_faces_the_largest_most_central_is_chosen_whatever_their_order():
    from mer.face import choose_face

    shape = (480, 640)
    subject = [250, 150, 390, 300]       # centred, 140 x 150
    bystander = [480, 0, 640, 170]       # in a corner, 160 x 170 (larger)
    small = [300, 200, 340, 240]         # centred but small (a photo on the wall)
    boxes = [bystander, small, subject]
    assert choose_face(np.array(boxes), shape) == 2
    assert choose_face(np.array(boxes[::-1]), shape) == 0
    assert choose_face(np.array([[0, 0, 400, 400], subject]), shape) == 0  # much larger wins


def test_homography_head_model_removes_a_turning_head_that_a_similarity_leaves():
    """A flow field made of a slight out-of-plane turn (an exact homography) plus one local AU
    blob: the homography fit leaves less of the head's motion in far ROIs than the similarity,
    and neither removes the AU."""
    from mer.face import template_landmarks
    from mer.features import HeadMotion, RoiPooler, roi_boxes

    size = 192
    lm = template_landmarks(size, 4.6, 0.38)
    layout = roi_boxes(lm, roi_specs("default"), size, 0.05, [28, 29, 30])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    H = np.array([[1.004, 0.002, -0.5], [-0.001, 1.003, 0.3], [4e-5, -3e-5, 1.0]])  # yaw/pitch ~1 degree
    den = H[2, 0] * xs + H[2, 1] * ys + H[2, 2]
    flow = np.stack([(H[0, 0] * xs + H[0, 1] * ys + H[0, 2]) / den - xs,
                     (H[1, 0] * xs + H[1, 1] * ys + H[1, 2]) / den - ys], -1)
    cx, cy = lm[54]
    blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 6.0 ** 2))
    au = np.stack([0.8 * blob, -0.8 * blob], -1)
    flow = (flow + au).astype(np.float32)
    pool = RoiPooler(layout.boxes, size, 0.25, ("u", "v"))
    left = {}
    for method in ("similarity", "homography"):
        motion = HeadMotion(method, lm, layout.nose, size)(flow)
        left[method] = pool(flow, motion)
    far = [ROI["brow_left"], ROI["brow_right"], ROI["nose_31"], ROI["eyelid_left"]]
    residual = {m: np.abs(f[far]).max() for m, f in left.items()}
    assert residual["homography"] < 0.5 * residual["similarity"], residual
    au_roi = ROI["mouth_54"]
    for f in left.values():
        assert np.hypot(*f[au_roi]) > 0.7  # the AU itself stays


def test_every_apex_choice_gets_its_own_steps_flow_without_a_second_decode(tmp_path):
    """The steps' flows are kept until the onset-apex frames are chosen: each choice's flow is the
    one a fresh decode of its frame gives, and no frame is decoded twice."""
    from mer.frames import FolderFrames

    clip, _ = render(tmp_path, [12], blink_prob=1.0, blink_kinds=(1.0, 0.0, 0.0), amplitude_px=(1.0, 1.2),
                     head_motion=0.3)
    ex = Extractor(work_config(tmp_path, **{"preprocess.reanchor_px": 0.0}))  # the crop stays put
    frames = FolderFrames.of(clip.frames_dir)
    rec = ex._check(clip, frames)
    read = ex._reader(clip, frames, rec)
    ref_pos, ref_img = ex._reference(read, len(frames))
    _, _, found = ex._find_face(clip, frames, read, ref_pos, ref_img, rec)
    face = ex._face(clip, ref_img, found, rec)
    track = ex._track(clip, frames, read, ref_pos, ref_img, face, rec)
    assert rec["frames_read"] == len(track.numbers) and track.flows == []  # PNG: each grid frame once, then freed
    chosen = {mode: number for mode, (number, _) in track.apexes.items()}
    assert len(set(chosen.values())) >= 2, chosen  # the blink's frame and the AU's
    for mode, (number, flow) in track.apexes.items():
        img = read(list(frames.numbers).index(number))
        fresh = ex._head_free(*ex._flow_at(track, img, face, np.zeros(2), f"frame {number}"))
        np.testing.assert_allclose(flow, fresh, atol=0.01, err_msg=mode)
        for other, (n2, flow2) in track.apexes.items():  # a mix-up of two steps would show
            assert n2 == number or np.abs(flow - flow2).max() > 0.1, (mode, other)
    assert track.best is track.apexes[ex.cfg["preprocess"]["apex_frame"]]


def test_blink_free_apex_skips_the_blink_that_max_motion_picks(tmp_path, caplog):
    clip, truth = render(tmp_path, [12], blink_prob=1.0, blink_kinds=(1.0, 0.0, 0.0), amplitude_px=(1.0, 1.2),
                         head_motion=0.3)
    t, closure = truth["times_ms"], truth["blink"]
    frames, apex, maps = {}, {}, {}
    for mode in ("max_motion", "blink_free", "spotted"):
        res = Extractor(work_config(tmp_path, **{"preprocess.apex_frame": mode})).process(clip)
        apex[mode] = int(res["apex_motion_frame"])
        frames[mode] = res["times_ms"][list(res["frame_numbers"]).index(apex[mode])]
        maps[mode] = res["apex_map"]
    # every clip keeps every choice's frame, and its map where it is not apex_map's: training picks one
    from mer.training import apex_map_of

    for mode in ("max_motion", "blink_free", "spotted"):
        assert int(res[f"apex_frame_{mode}"]) == apex[mode]
        np.testing.assert_array_equal(apex_map_of(res, mode, Path("c.npz")), maps[mode])
        assert (f"apex_map_{mode}" in res) == (apex[mode] != apex["spotted"]), mode  # no copy of apex_map
    assert apex["max_motion"] != apex["spotted"]  # the blink's frame: a map of its own
    with pytest.raises(UserError, match="holds no 'spotted' apex map"):
        apex_map_of({"apex_map": res["apex_map"]}, "spotted", Path("c.npz"))
    def closed(ms):
        return np.interp(ms, t, closure) > 0.05
    assert closed(frames["max_motion"])  # the lid's motion dwarfs the smile
    lo, hi = peak_window(truth, 12)
    for mode in ("blink_free", "spotted"):
        assert not closed(frames[mode]), mode
        assert lo - 40 <= frames[mode] <= hi + 40, mode  # the smile's peak instead
    with caplog.at_level("WARNING", logger="mer"):  # without v the blinks cannot be seen: said, max-motion used
        ex = Extractor(work_config(tmp_path, **{"preprocess.apex_frame": "blink_free", "preprocess.channels": "[mag]"}))
    assert "apex_frame=blink_free finds blinks in the v channel" in caplog.text
    assert ex.process(clip)["apex_motion_frame"] == apex["max_motion"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mer"):  # spotting needs u and v: said, max-motion used
        ex = Extractor(work_config(tmp_path, **{"preprocess.apex_frame": "spotted", "preprocess.channels": "[mag]"}))
    assert "apex_frame=spotted spots the apex in the u and v channels" in caplog.text
    assert ex.process(clip)["apex_motion_frame"] == apex["max_motion"]
    with pytest.raises(ValueError, match="apex_frame must be one of spotted, blink_free, max_motion"):
        Extractor(work_config(tmp_path, **{"preprocess.apex_frame": "apex"}))


def test_spotting_finds_the_expression_under_a_larger_head_drift():
    """Flow from the first frame accumulates slow drift: by the clip's end it outweighs a
    micro-expression that rose and fell in the middle. The largest motion is then the end; the
    spotted apex is the expression's peak, whatever the drift's size."""
    from mer.features import spot_apex_score

    t = np.arange(0.0, 1000.0, 10.0)
    rng = np.random.default_rng(0)
    for drift in (0.5, 2.0, 5.0):
        uv = np.zeros((len(t), 18, 2))
        uv[..., 0] = drift * t[:, None] / t[-1]  # slow drift, the same in every ROI
        bump = np.exp(-0.5 * ((t - 420.0) / 60.0) ** 2)
        uv[:, 14, 1] -= 1.0 * bump  # one AU, one ROI
        uv += rng.normal(0, 0.02, uv.shape)
        assert np.argmax(np.linalg.norm(uv, axis=-1).sum(1)) >= len(t) - 5  # max motion: the end
        k = int(np.argmax(spot_apex_score(uv, t, 200.0)))
        assert 380 <= t[k] <= 460, (drift, t[k])
    with pytest.raises(ValueError, match="apex_spot_ms must be > 0"):
        spot_apex_score(uv, t, 0.0)
    with pytest.raises(ValueError, match=r"uv must be \(T, R, 2\)"):
        spot_apex_score(uv[..., 0], t, 200.0)


def test_channels_are_found_by_name_in_preprocessing_inspect_and_training(synth_root, tmp_path):
    root = _small_copy(synth_root, tmp_path / "D", {"train": _names(synth_root, "train.xlsx", 6)})
    cfg = work_config(tmp_path, **{"preprocess.channels": "[mag, strain]"})
    cdir = run(root, cfg)
    z = C.load_clip(next((cdir / "train" / "clips").glob("*.npz")))
    assert z["features"].shape[-1] == 2 and (z["features"][..., 0] >= 0).all()  # mag first: never negative
    png = run(root, cfg, inspect=_names(synth_root, "train.xlsx", 1)[0], inspect_out=str(tmp_path / "i.png"))
    assert png.stat().st_size > 20_000
    from mer.training import load_clips

    assert load_clips(cdir, "train", channels=["strain"]).features[0].shape[-1] == 1
    # the same values as the default channels' mag and strain, and the same max-motion apex frame
    from mer.features import motion_magnitude

    full = run(root, work_config(tmp_path / "full", **{"preprocess.apex_frame": "max_motion"}))
    for f in (cdir / "train" / "clips").glob("*.npz"):
        a, b = C.load_clip(f), C.load_clip(full / "train" / "clips" / f.name)
        np.testing.assert_allclose(a["features"], b["features"][..., 2:4], rtol=1e-5, atol=1e-6)
        assert int(a["apex_motion_frame"]) == int(b["apex_motion_frame"])
        shown, what = motion_magnitude(a["features"], ["mag", "strain"])  # what inspect and explain plot
        np.testing.assert_array_equal(shown, a["features"][..., 0])
        assert "mag" in what


def test_workers_started_with_spawn_cache_the_same_clips_as_forked_ones(synth_root, tmp_path, monkeypatch):
    """The start method FAN on a GPU needs: workers that import everything afresh (nothing
    inherited from the parent) produce the same features as forked ones."""
    import mer.preprocessing as P

    root = _small_copy(synth_root, tmp_path / "D", {"train": _names(synth_root, "train.xlsx", 4)})
    out = {}
    for method in ("fork", "spawn"):
        monkeypatch.setattr(P, "start_method", lambda cfg, device, m=method: m)
        cdir = run(root, work_config(tmp_path / method), workers=2)
        m = C.read_manifest(cdir, "train")
        assert (m["status"] == "ok").all() and len(m) == 4
        out[method] = {s: np.load(cdir / f)["features"] for s, f in zip(m["sample"], m["file"])}
    assert out["fork"].keys() == out["spawn"].keys()
    for s in out["fork"]:
        np.testing.assert_array_equal(out["fork"][s], out["spawn"][s])
