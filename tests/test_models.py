import pytest
import torch
import torch.nn.functional as F

from mer.models import ApexCNN, SequenceTransformer, build_model, model_settings

R, C, K = 18, 2, 3
SMALL = dict(dim=32, depth=2, heads=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads; on a busy 2-core box they cost up to 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_batch(lengths, t_max=None, r=R, c=C, s=16, step_ms=10.0, seed=0):
    """Variable-length masked batch; padding filled with garbage."""
    g = torch.Generator().manual_seed(seed)
    b, t_max = len(lengths), t_max or max(lengths)
    x = torch.randn(b, t_max, r, c, generator=g)
    times = torch.arange(t_max).float().mul(step_ms).expand(b, t_max).clone()
    mask = torch.arange(t_max)[None] < torch.tensor(lengths)[:, None]
    x[~mask] = 1e3 * torch.randn(int((~mask).sum()), r, c, generator=g)  # garbage padding
    times[~mask] = 1e6
    apex = torch.randn(b, 3, s, s, generator=g)
    return {"x": x, "times": times, "mask": mask, "apex": apex}


def seq_model(seed=0, **kw):
    torch.manual_seed(seed)
    return SequenceTransformer(R, C, K, **{**SMALL, **kw})


def test_shapes_and_forward_batch():
    batch = make_batch([5, 12, 1, 9])
    m = seq_model().eval()
    assert m.inputs == ("x", "times", "mask")
    logits = m.forward_batch(batch)
    assert logits.shape == (4, K) and torch.isfinite(logits).all()
    logits2, attn = m(batch["x"], batch["times"], batch["mask"], return_attention=True)
    torch.testing.assert_close(logits, logits2, atol=1e-5, rtol=0)
    assert attn["roi"].shape == (4, 12, R) and attn["time"].shape == (4, 12)
    assert seq_model(shared_roi_embed=True).eval().forward_batch(batch).shape == (4, K)

    a = ApexCNN(n_classes=K)
    assert a.inputs == ("apex",)
    assert a.forward_batch(batch).shape == (4, K)
    assert a(torch.randn(2, 3, 64, 64)).shape == (2, K)  # any map size


def test_default_sizes_build():
    m = build_model("sequence", n_rois=R, n_channels=4, n_classes=7)
    assert len(m.transformer.layers) == 5
    out = m.eval()(torch.randn(2, 30, R, 4), torch.arange(30.0).expand(2, 30) * 10,
                   torch.ones(2, 30, dtype=torch.bool))
    assert out.shape == (2, 7)


def test_padding_invariance():
    m = seq_model().eval()
    short = make_batch([7], seed=1)
    padded = make_batch([7], t_max=40, seed=1)
    padded["x"][:, :7] = short["x"]
    with torch.no_grad():
        a = m.forward_batch(short)
        b = m.forward_batch(padded)
        padded["x"][0, 20] = float("nan")  # even NaN garbage in padding must not leak
        c = m.forward_batch(padded)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_attention_outputs():
    batch = make_batch([6, 10, 3])
    m = seq_model().eval()
    with torch.no_grad():
        _, attn = m(batch["x"], batch["times"], batch["mask"], return_attention=True)
    mask = batch["mask"]
    roi, time = attn["roi"], attn["time"]
    torch.testing.assert_close(roi.sum(-1)[mask], torch.ones(int(mask.sum())))
    assert (roi[~mask] == 0).all() and (roi >= 0).all()
    assert (time[~mask] == 0).all() and (time >= 0).all()
    torch.testing.assert_close(time.sum(-1), torch.ones(3))  # CLS self-share excluded


def test_roi_dropout_train_only():
    batch = make_batch([8, 8])
    m = seq_model(roi_dropout=0.5)
    m.train()
    _, attn = m(batch["x"], batch["times"], batch["mask"], return_attention=True)
    roi = attn["roi"]
    assert (roi == 0).any()  # some ROIs hidden
    torch.testing.assert_close(roi.sum(-1), torch.ones(2, 8))
    m.eval()
    _, attn = m(batch["x"], batch["times"], batch["mask"], return_attention=True)
    assert (attn["roi"] > 0).all()


def test_determinism_with_seed():
    batch = make_batch([5, 9])
    outs = []
    for _ in range(2):
        m = seq_model(seed=123)  # train mode: dropout also seeded
        torch.manual_seed(7)
        outs.append(m.forward_batch(batch))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert not torch.equal(seq_model(seed=1).eval().forward_batch(batch),
                           seq_model(seed=2).eval().forward_batch(batch))


def fit(model, batch, y, steps, lr=3e-3):
    """Full-batch AdamW with gradient clipping (as a training loop should do)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model.forward_batch(batch), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model.forward_batch(batch).argmax(-1) == y).float().mean().item()


def synthetic_sequences(n_per_class=8, t=20, seed=0):
    """Class 0: ROI 2 moves early; class 1: ROI 2 moves late; class 2: ROI 11 moves early.

    Separating 0 from 1 needs the time embedding, 0 from 2 needs the ROI identity."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * n_per_class
    y = torch.arange(3).repeat_interleave(n_per_class)
    lengths = torch.randint(t // 2 + 4, t + 1, (n,), generator=g)
    x = 0.05 * torch.randn(n, t, R, C, generator=g)
    for i in range(n):
        roi, start = {0: (2, 1), 1: (2, t // 2), 2: (11, 1)}[int(y[i])]
        x[i, start:start + 3, roi] += torch.tensor([1.0, -0.5])
    mask = torch.arange(t)[None] < lengths[:, None]
    times = torch.arange(t).float().mul(35.0).expand(n, t).clone()
    return {"x": x, "times": times, "mask": mask}, y


def test_sequence_model_overfits_synthetic():
    batch, y = synthetic_sequences()
    torch.manual_seed(0)
    m = SequenceTransformer(R, C, 3, dim=32, depth=2, heads=4, dropout=0.0)
    assert fit(m, batch, y, steps=100) == 1.0


def test_apex_cnn_overfits_synthetic():
    g = torch.Generator().manual_seed(0)
    n, s = 24, 32
    y = torch.arange(3).repeat_interleave(n // 3)
    apex = 0.1 * torch.randn(n, 3, s, s, generator=g)
    for i, c in enumerate(y.tolist()):  # a blob of motion in a class-specific face region
        r0, c0 = [(4, 4), (4, 20), (20, 12)][c]
        apex[i, :2, r0:r0 + 8, c0:c0 + 8] += 1.0
    torch.manual_seed(0)
    m = ApexCNN(n_classes=3, dropout=0.0)
    assert fit(m, {"apex": apex}, y, steps=60) == 1.0


def test_build_model_registry():
    m = build_model("sequence", n_rois=R, n_channels=C, n_classes=K, **SMALL)
    assert isinstance(m, SequenceTransformer)
    a = build_model("apex_cnn", n_rois=R, n_channels=C, n_classes=K, width=4)
    assert isinstance(a, ApexCNN)
    with pytest.raises(ValueError, match=r"unknown model 'lstm'.*apex_cnn.*sequence"):
        build_model("lstm", R, C, K)
    with pytest.raises(ValueError, match=r"\['dimm'\].*valid settings.*'dim'"):
        build_model("sequence", R, C, K, dimm=32)
    with pytest.raises(ValueError, match=r"\['depth'\].*'width'"):
        build_model("apex_cnn", R, C, K, depth=3)
    assert "n_rois" not in model_settings("sequence") and "dim" in model_settings("sequence")


def test_bad_input_shape_is_clear():
    m = seq_model().eval()
    with pytest.raises(ValueError, match="ROIs"):
        m(torch.randn(1, 4, R, C + 1), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(KeyError, match="missing"):
        m.forward_batch({"x": torch.zeros(1, 4, R, C)})
