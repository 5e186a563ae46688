"""The benchmarks run as documented (their figures are quoted in the README, not asserted)."""

import re

from mer import bench


def test_preprocess_benchmark_reports_every_figure(synth_root, capsys):
    bench.main(["preprocess", "--data", str(synth_root), "--frames", "400x300:png", "--limit", "2", "--reference-clips", "8"])
    out = capsys.readouterr().out
    per, dec, flow = (float(x) for x in re.search(
        r"CPU per frame read +([\d.]+) ms; decode +([\d.]+) ms \+ one flow call +([\d.]+) ms", out).groups())
    assert per > dec > 0 and per > flow > 0
    assert re.search(r"\d+ clips of DFME_small: CPU per clip \d+ ms vs \d+ ms for the reference", out)
    assert re.search(r"linear-probe UF1 .*: ours 0\.\d{3}, reference 0\.\d{3}", out)
    assert re.search(r"peak memory of one worker on a 500-frame clip: \d+ MB", out)
