"""Action-unit strings as real annotation tables write them -> canonical AU codes.

One parser for every form seen in the released CASME II, SAMM, CAS(ME)^3 and DFME tables:

- separators: ``+``, ``,`` and ``;``, with or without spaces (``4+L10``, ``12+15 ``, ``L12 + 61``,
  ``1,2``); the order is not meaningful (``2+1`` = ``1+2``): codes come back sorted by AU number;
- an ``AU`` prefix (``AU4``, ``AU 4``, ``au12``) and Excel numbers (``4.0``) are read as the AU;
- sides and positions: ``L``/``R`` (left/right), ``T``/``B`` (top/bottom lip), ``A`` (asymmetric,
  SAMM) and ``A/L``, ``A/R``. By default only the AU number is kept (``L12`` -> ``12``); with
  ``keep_sides=True`` the side is kept as written (``L12``, ``R6``, ``T28``, ``B23``, ``A12``;
  ``A/L12`` -> ``L12``);
- intensity letters A-E after the number are dropped (``15A``, ``R6A``, ``A12B``, ``43E``), also
  when two are given (``10A/B``, ``4A/B``);
- alternatives, where the coder hesitated (``(R6 or R12)``, ``L12 or L14``, ``R14A or 17A or 24A``):
  every alternative is kept by default (``alternatives="all"``, as FED-PsyAU's parsed column does:
  each may be present), or only the first one (``alternatives="first"``);
- ``ref(7B)``: an AU marked "ref" in SAMM's coding is kept by default (``keep_ref=True``; the
  parsed column of FED-PsyAU keeps it too), dropped with ``keep_ref=False``;
- ``?`` alone (not coded) gives no AU and no warning; a trailing ``?`` (``L12?``, uncertain) is
  dropped and the AU kept.

Anything else (``soft focus``, ``x``) is an unreadable token: it is skipped with a warning that
names where it came from (``where``), never an exception.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger("mer.aus")

_TOKEN = re.compile(
    r"^(?:AU)?(?P<side>A/[LR]|[LR]/A|[LRTBA])?(?:AU)?(?P<num>\d{1,2})(?P<intensity>[A-E](?:/[A-E])?)?\??$",
    re.I,
)
_REF = re.compile(r"^ref\s*\((?P<inner>[^()]*)\)$", re.I)
_OR = re.compile(r"\s+or\s+", re.I)


def _split_top(text: str) -> list[str]:
    """Split on + , ; outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch in "+,;" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _unwrap(text: str) -> str:
    """Drop unbalanced or enclosing parentheses: '(R6' -> 'R6', '(12)' -> '12', 'ref(7B)' kept."""
    text = text.strip()
    if text.startswith("(") and (text.endswith(")") or ")" not in text):
        text = text[1:]
    if text.endswith(")") and "(" not in text:
        text = text[:-1]
    return text.strip()


def _code(token: str, keep_sides: bool) -> str | None:
    """One AU token ('R6A', 'A/L12', 'AU 4', 'T28') -> '6' / 'L12' ...; None if unreadable."""
    m = _TOKEN.match(re.sub(r"\.0$", "", re.sub(r"\s+", "", token)))  # '4.0': a number cell as text
    if m is None:
        return None
    num = str(int(m["num"]))
    side = (m["side"] or "").upper()
    if not keep_sides or not side:
        return num
    side = side.replace("A/", "").replace("/A", "")  # asymmetric, stronger on one side: that side
    return side + num


def parse_aus_report(text: object, keep_sides: bool = False, alternatives: str = "all",
                     keep_ref: bool = True) -> tuple[tuple[str, ...], list[str]]:
    """Canonical AU codes of one cell and the tokens that could not be read (no logging)."""
    if alternatives not in ("all", "first"):
        raise ValueError(f"alternatives must be 'all' or 'first', got '{alternatives}'")
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return (), []
    if isinstance(text, (int, float)) and float(text).is_integer():
        text = str(int(text))  # an Excel number cell: 4.0 -> '4'
    text = str(text).strip()
    if text in ("", "?", "-", "/", "nan", "None"):
        return (), []
    codes: list[str] = []
    bad: list[str] = []
    for term in _split_top(text):
        if term.startswith("(") and term.endswith(")"):
            term = term[1:-1].strip()
        options = [_unwrap(o) for o in _OR.split(term)]
        if alternatives == "first":
            options = options[:1]
        for opt in options:
            if not opt:  # stray brackets
                continue
            ref = _REF.match(opt)
            if ref:
                if not keep_ref:
                    continue
                opt = ref["inner"].strip()
            words = opt.split()
            found = [_code(w, keep_sides) for w in words] if len(words) > 1 else []
            if found and all(found):  # '4 7' written without '+'
                codes += found
                continue
            code = _code(opt, keep_sides)  # 'AU 4', 'R 12'
            if code is None:
                bad.append(opt)
            else:
                codes.append(code)
    return tuple(sorted(dict.fromkeys(codes), key=_sort_key)), bad


def parse_aus(text: object, keep_sides: bool = False, where: str = "", alternatives: str = "all",
              keep_ref: bool = True) -> tuple[str, ...]:
    """Canonical AU codes of one AU cell: '4+L10' -> ('4', '10'), or ('4', 'L10') with keep_sides.

    Unreadable tokens are skipped with one warning naming `where` (e.g. 'train/sub01_EP02_01f')."""
    codes, bad = parse_aus_report(text, keep_sides, alternatives, keep_ref)
    if bad:
        log.warning("%sAU string '%s': %s not understood (skipped)", f"{where}: " if where else "", text,
                    ", ".join(f"'{b}'" for b in bad))
    return codes


def _sort_key(code: str) -> tuple[int, str]:
    return int(re.sub(r"\D", "", code)), code


def au_vocabulary(parsed_lists: Iterable[Sequence[str]], min_count: int = 1) -> list[str]:
    """The AU codes that occur in at least `min_count` clips, sorted by AU number."""
    counts = Counter(c for codes in parsed_lists for c in set(codes))
    return sorted((c for c, n in counts.items() if n >= min_count), key=_sort_key)


def multi_hot(parsed: Sequence[str] | Sequence[Sequence[str]], vocab: Sequence[str]) -> np.ndarray:
    """Multi-hot targets: a list of clips' codes -> (N, V) float32; one clip's codes (a tuple of
    strings) -> (V,). Codes outside the vocabulary are ignored."""
    index = {c: i for i, c in enumerate(vocab)}
    single = len(parsed) > 0 and isinstance(parsed[0], str)
    rows = [parsed] if single else parsed
    out = np.zeros((len(rows), len(vocab)), np.float32)
    for r, codes in enumerate(rows):
        for c in codes:
            if c in index:
                out[r, index[c]] = 1.0
    return out[0] if single else out
