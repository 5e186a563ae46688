"""Device handling: --device parsed and checked once, before anything is written."""

import os
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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where CUDA fails")
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


def test_deterministic_kernels_are_really_switched_on_and_off():
    import torch

    from mer import models

    try:
        devices.set_deterministic("cpu", True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and not models.MATH_ATTENTION  # the CPU has no fused kernels
        devices.set_deterministic("cuda:0", True)
        assert models.MATH_ATTENTION and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
        devices.set_deterministic("cuda:0", False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert not models.MATH_ATTENTION
    finally:
        devices.set_deterministic("cpu", True)


def test_switching_deterministic_kernels_does_not_load_the_compiler():
    """torch.use_deterministic_algorithms imports torch._inductor (2 s per process); nothing here
    compiles, so the switch is set without it."""
    code = ("import sys, torch; from mer import devices; devices.set_deterministic('cpu', True); "
            "assert torch.are_deterministic_algorithms_enabled(); print('torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_resumed_optimiser_keeps_its_step_counters_on_the_cpu(tmp_path):
    """Checkpoints load onto the CPU: moments follow the parameters to the device, AdamW's step
    counters stay on the host (on a GPU they would cost a sync per parameter per step)."""
    import torch

    from mer.training import load_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save({"opt": opt.state_dict()}, tmp_path / "last.pt")
    on_device = torch.nn.Linear(3, 2, device="meta")  # stands for the GPU: stray host tensors raise
    resumed = torch.optim.AdamW(on_device.parameters())
    resumed.load_state_dict(load_checkpoint(tmp_path / "last.pt")["opt"])
    state = list(resumed.state.values())
    assert state and all(s["step"].device.type == "cpu" and s["exp_avg"].device.type == "meta" for s in state)


def test_jobs_on_a_gpu_follow_its_free_memory(monkeypatch, caplog):
    import torch

    from mer.training import resolve_jobs

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 16 * 2**30))
    monkeypatch.setattr("mer.cli.cpu_count", lambda: 8)
    assert resolve_jobs("auto", "cuda:0", 15, gpu_job_mb=2048) == 4  # 80% of 10 GB at 2 GB each
    assert resolve_jobs("auto", "cuda:0", 2, gpu_job_mb=512) == 2  # never more than the runs
    assert resolve_jobs("auto", "cuda:0", 15, gpu_job_mb=256) == 8  # nor than the CPU cores
    with caplog.at_level("WARNING", logger="mer"):
        assert resolve_jobs("6", "cuda:0", 15, gpu_job_mb=2048) == 6  # asked for: done, with a word on memory
    assert "holds about 4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mer"):
        resolve_jobs("3", "cuda:0", 15, gpu_job_mb=2048)
    assert "holds about" not in caplog.text


def test_processes_of_one_run_write_its_report_one_after_another_and_once(trained_runs, tmp_path):
    """The report is written under a lock on the run folder: a process that finishes while another
    writes waits, then reads every result saved so far (the last to finish writes it whole); a
    process with nothing new to report leaves it as it is."""
    import fcntl
    import os
    import shutil
    import threading
    import time

    from mer.report import write_report_locked

    _, runs = trained_runs
    run = tmp_path / "run"
    shutil.copytree(runs["sequence"], run)
    write_report_locked(run)
    before = (run / "report.json").stat().st_mtime_ns
    write_report_locked(run)  # no new result: not written again
    assert (run / "report.json").stat().st_mtime_ns == before
    with open(run / ".report.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        writer = threading.Thread(target=write_report_locked, args=(run,))
        writer.start()
        time.sleep(1.0)
        assert writer.is_alive() and (run / "report.json").stat().st_mtime_ns == before  # waits for the lock
        oof = run / "fold1" / "seed0" / "oof.csv"  # a fold finishes meanwhile
        os.utime(oof, ns=(oof.stat().st_atime_ns, oof.stat().st_mtime_ns + 10**9))
        fcntl.flock(held, fcntl.LOCK_UN)
    writer.join(timeout=60)
    assert not writer.is_alive() and (run / "report.json").stat().st_mtime_ns > before


def test_train_py_deterministic_flag_reaches_the_run(synth_cache, tmp_path):
    import yaml

    _, cdir = synth_cache
    base = [sys.executable, str(ROOT / "train.py"), "--cache", str(cdir), "--fold", "0", "--seeds", "0", "--jobs", "1",
            "--device", "cpu", "--set", f"train.run_dir={tmp_path}", "--set", "train.epochs=1",
            "--set", "train.min_steps=0", "--set", "train.folds=3"]
    out = subprocess.run(base + ["--deterministic", "maybe"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--deterministic" in out.stderr
    out = subprocess.run(base + ["--deterministic", "false"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    saved = yaml.safe_load((tmp_path / "sequence" / "fold0" / "seed0" / "config.yaml").read_text())
    assert saved["train"]["deterministic"] is False
