"""Device handling: --device parsed and checked once, before anything is written."""

import subprocess
import sys

import pytest

from conftest import ROOT
from mer import devices
from mer.devices import describe_device_error, deterministic_for, parse_device
from mer.errors import UserError


@pytest.mark.parametrize("bad", ["cuda:abc", "cuda:", "cuda:-1", "cuda:0,1", "gpu", "cuda0", ""])
def test_malformed_device_strings_are_refused(bad):
    with pytest.raises(UserError, match="--device must be auto, cpu, cuda or cuda:N"):
        parse_device(bad)


def test_device_index_is_checked_against_the_gpus_present(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 1)
    assert parse_device("cuda") == "cuda" and parse_device("CUDA:0") == "cuda:0" and parse_device("auto") == "cuda"
    with pytest.raises(UserError, match=r"cuda:1: this machine has 1 CUDA device\(s\) \(cuda:0\)"):
        parse_device("cuda:1")
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    assert parse_device("auto") == "cpu" and parse_device("cpu") == "cpu"
    with pytest.raises(UserError, match="torch sees no CUDA device"):
        parse_device("cuda:0")


def test_auto_does_not_initialise_cuda():
    import torch

    parse_device("auto")
    assert not torch.cuda.is_initialized()  # a process may still fork workers afterwards


def test_a_bad_device_stops_train_py_before_anything_is_written(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--device", "cuda:abc",
                          "--set", f"train.run_dir={tmp_path / 'runs'}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--device must be auto, cpu, cuda or cuda:N" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()
    out = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--root", str(tmp_path), "--device", "cuda:7"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--device cuda:7" in out.stderr and "Traceback" not in out.stderr


def test_device_errors_are_told_apart_from_broken_models():
    oom = RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
    assert "ran out of memory" in describe_device_error(oom, "cuda:0")
    assert "device cuda:1 failed" in describe_device_error(RuntimeError("CUDA error: invalid device ordinal"), "cuda:1")
    assert describe_device_error(RuntimeError("PytorchStreamReader failed reading zip archive"), "cuda") is None
    assert describe_device_error(KeyError("model"), "cpu") is None


def test_deterministic_setting():
    assert deterministic_for("auto", "cpu") and not deterministic_for("auto", "cuda:0")
    assert deterministic_for(True, "cuda") and not deterministic_for(False, "cpu")
    with pytest.raises(UserError, match="train.deterministic"):
        deterministic_for("yes", "cpu")


def test_preprocess_uses_every_usable_core_by_default_and_takes_a_device():
    out = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    from mer.cli import cpu_count

    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and f"every usable core, here {cpu_count()})" in text and "--device" in text


def test_fan_on_a_gpu_starts_workers_with_spawn():
    from mer.preprocessing import start_method

    cfg = {"preprocess": {"landmarks": "fan"}}
    assert start_method(cfg, "cuda:0") == "spawn"
    assert start_method({"preprocess": {"landmarks": "dlib"}}, "cuda:0") == start_method(cfg, "cpu")


def _double(x):
    return 2 * x


def test_the_worker_pool_runs_with_spawn_too():
    from mer.workers import run_jobs

    assert sorted(v for _, v in run_jobs(_double, [1, 2, 3], 2, start_method="spawn")) == [2, 4, 6]


def test_a_gpu_that_fails_is_a_device_error_not_a_broken_model(trained_runs):
    """Checkpoints are read onto the CPU, then moved: here the move fails (no CUDA in this torch,
    as on a GPU that is missing, busy or full) and the message says the model files are fine."""
    from mer.predicting import load_models

    cfg, runs = trained_runs
    with pytest.raises(UserError) as e:
        load_models(runs["sequence"], "cuda:0")
    assert "the model files are fine" in str(e.value) and "delete" not in str(e.value)
    models = load_models(runs["sequence"], "cpu")
    assert next(models[0].model.parameters()).device.type == "cpu"
