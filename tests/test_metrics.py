import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from mer.metrics import confusion, format_scores, scores, uf1


def _by_definition(y, p, k):
    """The competition's formulas, counted by hand (no library): UF1 = mean over classes in truth
    or predictions of 2TP / (2TP + FP + FN); UAR = mean over classes in truth of TP / N_class."""
    f1s, recalls = [], []
    for c in range(k):
        tp = sum(1 for a, b in zip(y, p) if a == c and b == c)
        fp = sum(1 for a, b in zip(y, p) if a != c and b == c)
        fn = sum(1 for a, b in zip(y, p) if a == c and b != c)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
        if tp + fn:
            recalls.append(tp / (tp + fn))
    return sum(f1s) / len(f1s), sum(recalls) / len(recalls), sum(a == b for a, b in zip(y, p)) / len(y)


@pytest.mark.parametrize("seed", range(10))
def test_agrees_with_the_formulas_counted_by_hand_on_random_data(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    n = int(rng.integers(1, 60))
    y = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.4, y, rng.integers(0, k, n))
    uf1_hand, uar, acc = _by_definition(y.tolist(), p.tolist(), k)
    s = scores(y, p, n_classes=k)
    assert s["uf1"] == pytest.approx(uf1_hand, abs=1e-12)
    assert s["uar"] == pytest.approx(uar, abs=1e-12)
    assert s["acc"] == pytest.approx(acc, abs=1e-12)
    assert s["n"] == n
    assert confusion(y, p, k).sum() == n
    assert uf1(y, p, k) == pytest.approx(uf1_hand, abs=1e-12)  # the searches' fast UF1 agrees


def test_agrees_with_scikit_learn_where_classes_are_missing():
    """The definitions above equal scikit-learn's macro F1 and balanced accuracy with its default
    labels, also when a class is only predicted or only true."""
    y, p = [0, 0, 1, 1, 3], [0, 2, 1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _by_definition(y, p, 4)[0] == pytest.approx(f1_score(y, p, average="macro"))
        assert _by_definition(y, p, 4)[1] == pytest.approx(balanced_accuracy_score(y, p))
        assert _by_definition(y, p, 4)[2] == pytest.approx(accuracy_score(y, p))


def test_hand_computed_example():
    # truth:  0 0 0 1 1 2 ; pred: 0 0 1 1 2 2
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2, 2]
    s = scores(y, p, n_classes=3, class_names=["a", "b", "c"])
    # class 0: TP2 FP0 FN1 -> F1 4/5, R 2/3 ; class 1: TP1 FP1 FN1 -> 1/2, 1/2 ;
    # class 2: TP1 FP1 FN0 -> 2/3, 1
    assert s["uf1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert s["uar"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert s["acc"] == pytest.approx(4 / 6)
    pc = s["per_class"]
    assert isinstance(pc, pd.DataFrame)
    assert list(pc.columns) == ["class", "support", "precision", "recall", "f1", "predicted"]
    assert list(pc["class"]) == ["a", "b", "c"]
    assert list(pc["support"]) == [3, 2, 1]
    assert list(pc["predicted"]) == [2, 2, 2]
    assert pc["f1"].tolist() == pytest.approx([4 / 5, 1 / 2, 2 / 3])
    np.testing.assert_array_equal(confusion(y, p, 3), [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert format_scores(s) == "UF1 0.6556  UAR 0.7222  ACC 66.67%  (n=6)"


def test_class_predicted_but_absent_from_truth(recwarn):
    y = [0, 0, 1, 1]
    p = [0, 2, 1, 1]  # class 2 never true: counts with F1 0 in UF1, no recall in UAR
    s = scores(y, p, n_classes=3)
    assert s["uf1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert s["uar"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["per_class"].loc[2, "f1"] == 0 and s["per_class"].loc[2, "predicted"] == 1
    assert len(recwarn) == 0


def test_class_absent_from_both_is_left_out(recwarn):
    y = [0, 1, 0, 1]
    p = [0, 1, 1, 1]
    s7 = scores(y, p, n_classes=7)
    s2 = scores(y, p, n_classes=2)
    assert s7["uf1"] == pytest.approx(s2["uf1"]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert s7["uar"] == pytest.approx(s2["uar"]) == pytest.approx((1 / 2 + 1) / 2)
    assert len(s7["per_class"]) == 7
    assert (s7["per_class"].loc[2:, ["support", "precision", "recall", "f1", "predicted"]] == 0).all().all()
    assert confusion(y, p, 7).shape == (7, 7)
    assert len(recwarn) == 0


def test_class_in_truth_never_predicted(recwarn):
    y = [0, 1, 2, 2]
    p = [0, 1, 1, 1]  # class 2 never predicted: F1 0, recall 0
    s = scores(y, p, n_classes=3)
    assert s["uf1"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert s["uar"] == pytest.approx((1 + 1 + 0) / 3)
    assert s["per_class"].loc[2, "precision"] == 0
    assert len(recwarn) == 0


def test_accepts_lists_numpy_and_torch():
    torch = pytest.importorskip("torch")
    y, p = [0, 1, 2], [0, 2, 2]
    a = scores(y, p, 3)
    b = scores(np.array(y, dtype=np.int32), np.array(p), 3)
    c = scores(torch.tensor(y), torch.tensor(p), 3)
    assert a["uf1"] == b["uf1"] == c["uf1"]


@pytest.mark.parametrize(
    "y, p, k, match",
    [
        ([0, 1], [0], 3, "length mismatch"),
        ([], [], 3, "empty"),
        ([0, 7], [0, 1], 7, r"y_true\[1\] = 7 is outside \[0, 7\)"),
        ([0, 1], [0, -1], 7, r"y_pred\[1\] = -1 is outside"),
        ([0.0, 1.0], [0, 1], 7, "integer class ids"),
        ([[0, 1]], [[0, 1]], 7, "1-D"),
        ([0, 1], [0, 1], 0, "n_classes"),
    ],
)
def test_validation_errors(y, p, k, match):
    with pytest.raises(ValueError, match=match):
        scores(y, p, n_classes=k)
    with pytest.raises(ValueError, match=match):
        confusion(y, p, k)


def test_class_names_length_checked():
    with pytest.raises(ValueError, match="class_names"):
        scores([0, 1], [0, 1], n_classes=3, class_names=["a", "b"])


def test_fast_uf1_equals_scores_also_where_classes_are_missing():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, k = int(rng.integers(1, 40)), 7
        y = rng.integers(0, rng.integers(1, k + 1), n)
        p = rng.integers(0, rng.integers(1, k + 1), n)
        assert uf1(y, p, k) == pytest.approx(scores(y, p, k)["uf1"], abs=1e-12)
