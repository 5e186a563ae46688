"""The options beyond the winner's method: AU multi-task, test-time mirroring, blink handling,
masked ROI-motion pretraining; and the device hygiene of the training loop (meta device)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, kill_after_epoch
from mer.blinks import affected_rois, blink_score, eyelid_rois, suppress_blinks
from mer.features import DEFAULT_ROIS, mirror_permutation
from mer.models import MaskedMotionModel, SequenceTransformer, build_model
from mer.training import ClipData, Normaliser, au_targets, au_vocabulary_of, load_clips, predict_logits

CHANNELS = ["u", "v", "mag", "strain"]


def _meta(cdir):
    from mer import cache as C
    from mer.features import roi_specs

    return {"cache": str(cdir), "classes": C.read_meta(cdir)["classes"], "rois": roi_specs("default"),
            "channels": CHANNELS}


def test_mirror_tta_is_the_mean_of_the_plain_and_mirrored_passes(synth_cache):
    cfg, cdir = synth_cache
    clips = load_clips(cdir, "train").subset(np.arange(8))
    torch.manual_seed(0)
    model = build_model("sequence", 18, 4, 7, dim=32, depth=2, heads=4)
    norm = Normaliser.fit(clips.features)
    perm = mirror_permutation(DEFAULT_ROIS)
    mw = (perm, [0])
    plain = predict_logits(model, clips, norm, "cpu")
    both = predict_logits(model, clips, norm, "cpu", tta="mirror", mirror_with=mw)
    u_negated = np.array([-1, 1, 1, 1], np.float32)  # the mirrored face, written out: ROIs swapped, u negated
    flipped = ClipData(clips.samples, clips.subjects, clips.labels,
                       [f[:, perm] * u_negated for f in clips.features], clips.times,
                       [a[:, :, ::-1] * u_negated[:3, None, None] for a in clips.apex], clips.manifest)
    mirrored = predict_logits(model, flipped, norm, "cpu")
    np.testing.assert_allclose(both, (plain + mirrored) / 2, atol=1e-5)
    assert not np.allclose(plain, mirrored, atol=1e-4)  # the mirror pass is a different input
    with pytest.raises(Exception, match="predict.tta"):
        predict_logits(model, clips, norm, "cpu", tta="flip")


def test_au_targets_from_real_table_strings():
    clips = ClipData([f"c{i}" for i in range(6)], np.array(["a"] * 6), np.zeros(6, int), [np.zeros((2, 1, 1))] * 6,
                     [np.zeros(2)] * 6, [np.zeros((3, 2, 2))] * 6, pd.DataFrame(),
                     aus=["1+2", "AU4", "L12+R14", "4+7+L10", "R1", ""])
    vocab = au_vocabulary_of(clips, keep_sides=False, min_count=1)
    assert vocab == ["1", "2", "4", "7", "10", "12", "14"]
    y, known = au_targets(clips, vocab)
    assert known.tolist() == [True] * 5 + [False]  # no AU coded: unknown, not "no AU"
    assert y[2].tolist() == [0, 0, 0, 0, 0, 1, 1] and y[4].tolist() == [1, 0, 0, 0, 0, 0, 0]
    assert au_vocabulary_of(clips, keep_sides=True, min_count=1)[-2:] == ["L12", "R14"]
    assert au_vocabulary_of(clips, keep_sides=False, min_count=2) == ["1", "4"]


def test_au_multitask_trains_reports_per_au_f1_and_explains(synth_cache, tmp_path):
    from mer.explain import explain
    from mer.training import run_training

    cfg, cdir = synth_cache
    cfg = {**cfg, "train": {**cfg["train"], "au_weight": 0.5, "au_min_count": 3, "epochs": 8, "min_steps": 0,
                            "run_dir": str(tmp_path)}}
    run = run_training(cdir, cfg, "au", jobs=1)
    oof = pd.read_csv(run / "fold0" / "seed0" / "oof.csv", dtype={"aus": str})
    au_cols = [c for c in oof.columns if c.startswith("au_")]
    assert au_cols and "aus" in oof
    rep = json.loads((run / "report.json").read_text())
    every_fold = set()
    for f in run.glob("fold*/seed0/oof.csv"):  # each fold's head covers the AUs of its training side
        every_fold |= {c[3:] for c in pd.read_csv(f, nrows=1).columns if c.startswith("au_")}
    assert set(rep["per_au"]) == every_fold
    assert all(0 <= v["f1"] <= 1 and v["support"] >= 0 for v in rep["per_au"].values())
    assert "Auxiliary AU head" in (run / "report.md").read_text()
    state = torch.load(run / "fold0" / "seed0" / "model.pt", weights_only=False)
    assert state["au_vocab"] == [c[3:] for c in au_cols]
    sample = oof["sample"].iloc[0]
    png = explain(cfg, "au", sample, str(tmp_path / "x.png"))
    assert png.stat().st_size > 30_000
    # prediction needs no AUs: test clips carry none
    from mer.predicting import predict_run

    clips, probs, _ = predict_run(run, "test_B")
    assert probs.shape == (len(clips), 7) and np.allclose(probs.sum(1), 1)


def test_blink_score_sees_both_lids_going_down_and_not_lid_raisers():
    rois = DEFAULT_ROIS
    eyes = eyelid_rois(rois)
    assert [rois[i]["name"] for i in eyes] == ["eyelid_left", "eyelid_right"]
    assert {rois[i]["name"].split("_")[0] for i in affected_rois(rois)} == {"brow", "eyelid"}
    f = np.zeros((10, 18, 4), np.float32)
    f[3:6, eyes, 1] = 5.0  # both lids down by 5% of the eye distance: a blink
    f[7, eyes[0], 1] = 5.0  # one lid only: not a blink
    f[8, eyes, 1] = -1.5   # lids raised (AU6/7)
    f[:, 0, :] = 0.4        # a brow moving all along (AU4)
    s = blink_score(f, rois, CHANNELS)
    assert s[3:6].tolist() == [1, 1, 1] and s[[0, 1, 2, 6, 7, 8, 9]].max() == 0
    masked = suppress_blinks(f, rois, CHANNELS, "mask")
    assert (masked[3:6][:, affected_rois(rois)] == 0).all() and masked[3:6, 8].tolist() == f[3:6, 8].tolist()
    interp = suppress_blinks(f, rois, CHANNELS, "interp")
    np.testing.assert_allclose(interp[3:6, 0], 0.4)  # the brow's own motion carried across the blink
    np.testing.assert_allclose(interp[3:6, eyes, 1], 0.0)
    gated = suppress_blinks(f, rois, CHANNELS, "gate")
    assert (gated[3:6][:, affected_rois(rois)] == 0).all() and np.array_equal(gated[:3], f[:3])
    assert suppress_blinks(f, rois, CHANNELS, "none") is f
    with pytest.raises(ValueError, match="model.blink"):
        suppress_blinks(f, rois, CHANNELS, "blur")


def test_masked_pretraining_resumes_after_kill_9_bit_identically(tmp_path, synth_cache):
    cfg, cdir = synth_cache
    cmd = [sys.executable, str(ROOT / "train.py"), "--cache", str(cdir), "--fold", "0", "--seeds", "0",
           "--jobs", "1", "--device", "cpu", "--pretrain", "--set", "train.folds=3", "--set", "train.epochs=2",
           "--set", "train.min_steps=0", "--set", "pretrain.epochs=25", "--set", "model.sequence.depth=2",
           "--set", "model.sequence.dim=32", "--set", "model.sequence.heads=4"]
    killed = cmd + ["--set", f"train.run_dir={tmp_path / 'a'}"]
    proc = subprocess.Popen(killed, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = tmp_path / "a" / "sequence" / "pretrain" / "fold0" / "last.pt"
    kill_after_epoch(proc, ckpt, 3, 180)
    assert ckpt.is_file() and not (ckpt.parent / "encoder.pt").exists()
    out = subprocess.run(killed, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "pretraining: resuming after epoch" in out.stderr, out.stderr[-2000:]
    subprocess.run(cmd + ["--set", f"train.run_dir={tmp_path / 'b'}"], cwd=ROOT, check=True, capture_output=True)
    enc = [torch.load(tmp_path / x / "sequence" / "pretrain" / "fold0" / "encoder.pt", weights_only=False)
           for x in "ab"]
    assert all(torch.equal(enc[0]["encoder"][k], enc[1]["encoder"][k]) for k in enc[0]["encoder"])
    hist = enc[0]["history"]
    assert len(hist) == 25 and hist[-1]["loss"] < hist[0]["loss"]  # it learned to reconstruct
    # the classifier started from it: its weights differ from a run without pretraining
    a = torch.load(tmp_path / "a" / "sequence" / "fold0" / "seed0" / "model.pt", weights_only=False)
    assert a["model"]["roi_embed.weight"].shape == enc[0]["encoder"]["roi_embed.weight"].shape


def test_reconstruction_sees_only_what_is_not_hidden():
    torch.manual_seed(0)
    enc = SequenceTransformer(18, 4, 7, dim=32, depth=2, heads=4)
    m = MaskedMotionModel(enc).eval()
    x = torch.randn(2, 6, 18, 4)
    times = torch.arange(6.0).repeat(2, 1) * 10
    mask = torch.ones(2, 6, dtype=torch.bool)
    hs = torch.zeros(2, 6, dtype=torch.bool)
    hs[:, 2] = True
    hr = torch.zeros(2, 6, 18, dtype=torch.bool)
    hr[:, 4, 3] = True
    a = m.reconstruct(x, times, mask, hr, hs)
    x2 = x.clone()
    x2[:, 2] += 100.0  # a hidden step
    x2[:, 4, 3] -= 50.0  # a hidden ROI
    b = m.reconstruct(x2, times, mask, hr, hs)
    torch.testing.assert_close(a, b)  # nothing hidden leaks into the reconstruction


def test_one_training_step_evaluation_and_explain_on_the_meta_device(synth_cache):
    """Model and data on 'meta' (shapes only, no memory): any stray CPU tensor in the training
    loop, the evaluation or --explain's computations raises, as it would on a GPU."""
    from mer.explain import au_roi_share
    from mer.training import _epoch, _setup

    cfg, cdir = synth_cache
    clips = load_clips(cdir, "train")
    folds = np.arange(len(clips)) % 3
    cfg = {**cfg, "train": {**cfg["train"], "au_weight": 0.5, "au_min_count": 2}}
    st = _setup(clips, folds, 0, 0, cfg, _meta(cdir), "meta", None, None)
    assert next(st.model.parameters()).device.type == "meta"
    # every step of an epoch runs on the device; only reading the loss back (once, at the end) cannot
    with pytest.raises(RuntimeError, match=r"item\(\) cannot be called on meta tensors"):
        _epoch(st, cfg, "meta", np.random.default_rng(0), amp=False)
    assert st.opt.state and all(v["exp_avg"].device.type == "meta" for v in st.opt.state.values())
    assert st.train_data.x.device.type == st.oof_data.x.device.type == "meta"  # the clips live on the device
    batch = next(st.oof_data.in_order(4))
    with torch.no_grad():
        heads = st.model.forward_heads(batch)  # evaluation
        logits, att = st.model(batch["x"], batch["times"], batch["mask"], return_attention=True)  # --explain
    assert heads["emotion"].device.type == logits.device.type == att["roi"].device.type == "meta"
    assert heads["au"].shape[1] == len(st.au_vocab)
    one = {k: v[:1] for k, v in batch.items()}
    assert au_roi_share(st.model, one).shape == (len(st.au_vocab), 18)


def test_mixed_precision_epoch_runs_in_bfloat16_and_learns_alike(synth_cache):
    """train.amp: the same epoch in bfloat16 autocast gives a finite loss close to float32's,
    but not the same bits (the autocast really ran); off, nothing changes."""
    from mer.training import _epoch, _setup

    cfg, cdir = synth_cache
    clips = load_clips(cdir, "train")
    folds = np.arange(len(clips)) % 3

    def one_epoch(amp: bool) -> tuple[float, torch.Tensor]:
        st = _setup(clips, folds, 0, 0, cfg, _meta(cdir), "cpu", None, None)
        row = _epoch(st, cfg, "cpu", np.random.default_rng(0), amp=amp)
        return row["train_loss"], torch.cat([p.detach().flatten() for p in st.model.parameters()])

    loss32, w32 = one_epoch(False)
    loss16, w16 = one_epoch(True)
    assert np.isfinite(loss16) and abs(loss16 - loss32) < 0.05 * loss32
    assert not torch.equal(w16, w32)
    assert torch.equal(one_epoch(False)[1], w32)
