"""The AU-string parser on every form the released tables use (hand-written examples of each)."""

import logging

import numpy as np
import pytest

from mer.aus import au_vocabulary, multi_hot, parse_aus, parse_aus_report


@pytest.mark.parametrize("text,codes,sided", [
    ("4+L10", ("4", "10"), ("4", "L10")),            # CASME II: sides
    ("R1+R2", ("1", "2"), ("R1", "R2")),
    ("2+1", ("1", "2"), ("1", "2")),                 # CAS(ME)^3: unordered
    ("T28", ("28",), ("T28",)),                      # top / bottom lip
    ("B23", ("23",), ("B23",)),
    ("15A+17", ("15", "17"), ("15", "17")),          # SAMM: intensity letters
    ("R6A+R12", ("6", "12"), ("R6", "R12")),
    ("7C+A12B", ("7", "12"), ("7", "A12")),          # A: asymmetric, then intensity
    ("10A/B", ("10",), ("10",)),                     # two intensities
    ("(R6 or R12)+R15", ("6", "12", "15"), ("R6", "R12", "R15")),  # alternatives: all kept
    ("(R6 or R12) + R15", ("6", "12", "15"), ("R6", "R12", "R15")),
    ("L12 or L14", ("12", "14"), ("L12", "L14")),
    ("R14A or 17A or 24A", ("14", "17", "24"), ("R14", "17", "24")),
    ("ref(7B)+43C", ("7", "43"), ("7", "43")),       # ref(): kept
    ("7B+ ref(43)", ("7", "43"), ("7", "43")),
    ("ref(L10)+A12B", ("10", "12"), ("L10", "A12")),
    ("A/L12", ("12",), ("L12",)),
    ("AU4", ("4",), ("4",)),
    ("AU 1+AU2", ("1", "2"), ("1", "2")),
    ("12+15 ", ("12", "15"), ("12", "15")),          # spaces
    ("L12 + 61", ("12", "61"), ("L12", "61")),
    ("1,2", ("1", "2"), ("1", "2")),                 # commas (FED-PsyAU's parsed column)
    ("L12?", ("12",), ("L12",)),                     # uncertain: kept
    ("?", (), ()),                                   # not coded
    ("", (), ()),
    (4.0, ("4",), ("4",)),                           # an Excel number cell
    (float("nan"), (), ()),
    ("4+4", ("4",), ("4",)),
])
def test_every_real_form_parses(text, codes, sided, caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_aus(text, where="t") == codes
        assert parse_aus(text, keep_sides=True) == sided
    assert caplog.text == ""


def test_alternatives_first_and_ref_dropped_on_request():
    assert parse_aus("(R6 or R12)+R15", alternatives="first") == ("6", "15")
    assert parse_aus("ref(7B)+43", keep_ref=False) == ("43",)
    with pytest.raises(ValueError):
        parse_aus("4", alternatives="some")


def test_unreadable_token_is_a_warning_naming_the_row_never_a_crash(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_aus("R14+17+soft focus", where="train/026_5_1") == ("14", "17")
    assert "train/026_5_1: AU string 'R14+17+soft focus': 'soft focus' not understood (skipped)" in caplog.text
    assert parse_aus_report("x+4+(") == (("4",), ["x"])


def test_vocabulary_and_multi_hot():
    parsed = [parse_aus(t) for t in ("4+L10", "R1+R2", "2+1", "4")]
    vocab = au_vocabulary(parsed)
    assert vocab == ["1", "2", "4", "10"]
    assert au_vocabulary(parsed, min_count=2) == ["1", "2", "4"]
    m = multi_hot(parsed, vocab)
    assert m.shape == (4, 4) and m.dtype == np.float32
    assert m.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]
    assert multi_hot(("4", "99"), vocab).tolist() == [0, 0, 1, 0]  # one clip; unknown codes ignored
