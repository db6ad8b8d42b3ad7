"""The GPU gate (gpu_gate.py, wired in conftest.py): simulated machines, the decision, and whole pytest
sessions run in-process (pytester) on the real conftest with the machine's facts monkeypatched."""

import os

import pytest

import gpu_gate
from gpu_gate import Facts, decide

pytest_plugins = ["pytester"]

CPU = Facts(gpu=False, torch_devices=0, module_found=False, import_error=None, module_devices=None, expect_cuda="auto")
GOOD = Facts(gpu=True, torch_devices=1, module_found=True, import_error=None, module_devices=1, expect_cuda="auto")
BROKEN = Facts(
    gpu=True,
    torch_devices=1,
    module_found=True,
    module_devices=None,
    expect_cuda="auto",
    import_error="ImportError: libcudart.so.13: cannot open shared object file",
)
MISSING = Facts(
    gpu=True, torch_devices=1, module_found=False, import_error=None, module_devices=None, expect_cuda="auto"
)


def test_decide_on_simulated_machines():
    assert decide(CPU) == gpu_gate.Gate(False, False, None, decide(CPU).skip_reason)
    assert "torch.cuda.is_available() is False" in decide(CPU).skip_reason
    assert decide(GOOD) == gpu_gate.Gate(True, True, None, "")
    broken = decide(BROKEN)
    assert broken.gpu and not broken.native and "does not import" in broken.error and "libcudart" in broken.error
    blind = decide(Facts(**{**GOOD.__dict__, "module_devices": 0}))
    assert "sees 0" in blind.error and "torch sees 1" in blind.error
    assert "built without its CUDA module" in decide(MISSING).error and "LOOM_CUDA=0" in decide(MISSING).error
    cpu_only = decide(Facts(**{**MISSING.__dict__, "expect_cuda": "0"}))  # CPU-only on purpose: Triton still runs
    assert cpu_only.gpu and not cpu_only.native and cpu_only.error is None and "LOOM_CUDA=0" in cpu_only.skip_reason


def test_probe_on_this_machine():
    f = gpu_gate.probe()
    torch = pytest.importorskip("torch")
    assert f.gpu == torch.cuda.is_available()
    assert f.module_found == (f.import_error is not None or f.module_devices is not None)
    assert f.expect_cuda == os.environ.get("LOOM_CUDA", "auto").strip().lower()


@pytest.mark.parametrize(
    "expr, asks",
    [
        ("cuda", True),
        ("cuda and not slow", True),
        ("(cuda or slow)", True),
        ("not cuda", False),
        ("slow", False),
        ("", False),
        ("cudagraph", False),
    ],
)
def test_asks_for_cuda(expr, asks):
    assert gpu_gate.asks_for_cuda(expr) == asks


DRIVER_NO_GPU = Facts(**{**CPU.__dict__, "driver": True, "torch_build": "torch 2.13.0+cpu, CUDA None"})


def test_decide_driver_without_a_gpu_fails_unless_opted_out(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gate = decide(DRIVER_NO_GPU)
    assert not gate.gpu and "NVIDIA driver" in gate.error and "2.13.0+cpu" in gate.error
    assert "CUDA_VISIBLE_DEVICES=''" in gate.error and "LOOM_CUDA=0" in gate.error
    opted = decide(Facts(**{**DRIVER_NO_GPU.__dict__, "expect_cuda": "0"}))
    assert opted.error is None and not opted.gpu and "LOOM_CUDA=0" in opted.skip_reason
    assert decide(CPU).error is None  # no driver: a CPU machine, the cuda tests skip


@pytest.mark.parametrize(
    "smi, proc, driver", [(None, False, False), ("/usr/bin/nvidia-smi", False, True), (None, True, True)]
)
def test_probe_finds_the_driver(monkeypatch, smi, proc, driver):
    real_exists = os.path.exists
    monkeypatch.setattr(gpu_gate.shutil, "which", lambda name: smi if name == "nvidia-smi" else None)
    monkeypatch.setattr(gpu_gate.os.path, "exists", lambda p: proc if p == "/proc/driver/nvidia" else real_exists(p))
    assert gpu_gate.probe().driver == driver


def test_final_status_minus_m_cuda_fails_on_any_skip_but_the_opt_out():
    gate = decide(GOOD)
    assert gpu_gate.final_status(gate, "cuda", 3, 0) == (0, None)
    status, why = gpu_gate.final_status(gate, "cuda", 3, 0, (("t.py::a", "needs 2 GPUs"),))
    assert status == 1 and "t.py::a: needs 2 GPUs" in why and "skipped 1 cuda test" in why
    assert gpu_gate.final_status(gate, "cuda", 3, 0, (("t.py::b", "built without it (LOOM_CUDA=0)"),)) == (0, None)
    assert gpu_gate.final_status(gate, "not cuda", 0, 0, (("t.py::a", "x"),)) == (0, None)  # not a GPU check
    many = tuple((f"t.py::{i}", "no") for i in range(8))
    assert "(and 3 more)" in gpu_gate.final_status(gate, "cuda and not slow", 1, 0, many)[1]


_MODULE = """
import os

import pytest

@pytest.mark.cuda
def test_native():
    pass

@pytest.mark.cuda(triton_only=True)
def test_triton():
    pass

@pytest.mark.cuda(triton_only=True)
def test_skips_itself():
    if os.environ.get("SKIP_ONE"):
        pytest.skip("needs 2 GPUs")

def test_cpu():
    pass
"""


@pytest.fixture
def session(pytester, monkeypatch):
    """``run(facts, *args) -> (RunResult, outcomes)``: a pytest session on the real conftest.py."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "conftest.py")) as f:
        pytester.makeconftest(f.read())
    pytester.makepyfile(test_mod=_MODULE)
    pytester.makeini("[pytest]\nmarkers =\n    cuda: gpu\n    slow: slow\n")

    def run(facts, *args):
        monkeypatch.setattr(gpu_gate, "probe", lambda: facts)
        res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rA", *args)
        return res, res.parseoutcomes()

    return run


def test_session_cpu_machine_skips_and_minus_m_cuda_fails(session):
    res, out = session(CPU)
    assert res.ret == 0 and out == {"passed": 1, "skipped": 3}
    res, out = session(CPU, "-m", "cuda")  # a GPU check that runs nothing is a failure
    assert res.ret == 1 and out.get("skipped") == 3 and "ran no cuda test" in res.stdout.str()


def test_session_gpu_machine_runs_everything(session):
    res, out = session(GOOD)
    assert res.ret == 0 and out == {"passed": 4}
    res, out = session(GOOD, "-m", "cuda")
    assert res.ret == 0 and out == {"passed": 3, "deselected": 1}


def test_session_broken_cuda_build_fails_not_skips(session):
    res, out = session(BROKEN, "-m", "cuda")
    assert res.ret == 1 and out.get("errors") == 3 and "skipped" not in out
    assert "does not import" in res.stdout.str() and "libcudart" in res.stdout.str()
    res, out = session(BROKEN, "-m", "not cuda")  # even a run that selects no cuda test fails
    assert res.ret == 1 and out.get("passed") == 1 and "does not import" in res.stdout.str()


def test_session_cpu_only_build_on_purpose_runs_triton(session):
    res, out = session(Facts(**{**MISSING.__dict__, "expect_cuda": "0"}), "-m", "cuda")
    assert res.ret == 0 and out == {"passed": 2, "skipped": 1, "deselected": 1}


def test_session_minus_m_cuda_fails_when_one_cuda_test_skips(session, monkeypatch):
    monkeypatch.setenv("SKIP_ONE", "1")
    res, out = session(GOOD)  # the plain run: a skip is a skip
    assert res.ret == 0 and out == {"passed": 3, "skipped": 1}
    res, out = session(GOOD, "-m", "cuda")  # the GPU check: two passed, one skipped for its own reason
    assert res.ret == 1 and out == {"passed": 2, "skipped": 1, "deselected": 1}
    assert "GPU gate: -m 'cuda' skipped 1 cuda test(s)" in res.stdout.str()
    assert "test_mod.py::test_skips_itself: Skipped: needs 2 GPUs" in res.stdout.str()


def test_session_driver_but_torch_sees_no_gpu_fails_loudly(session, monkeypatch):
    res, out = session(DRIVER_NO_GPU)  # the plain `pytest` on a GPU machine with a CPU torch
    assert res.ret == 1 and out.get("errors") == 3 and out.get("passed") == 1
    assert "NVIDIA driver" in res.stdout.str() and "torch sees no CUDA device" in res.stdout.str()
    res, out = session(Facts(**{**DRIVER_NO_GPU.__dict__, "expect_cuda": "0"}))  # left out on purpose
    assert res.ret == 0 and out == {"passed": 1, "skipped": 3}


@pytest.mark.parametrize("fails, says", [("pip", "BUILD FAILED"), ("_native import cuda", "CUDA MODULE BROKEN")])
def test_gpu_check_stops_on_a_failed_build(tmp_path, fails, says):
    # bench/gpu_check.sh with a stand-in python that fails at the build (or at loading the CUDA module): the
    # script must stop there with a non-zero status, before the tests and benchmarks.
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *"{fails}"*) echo "stand-in failure"; exit 1;; esac\nexit 0\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), CHECK_SECONDS="60")
    res = subprocess.run(
        ["bash", os.path.join(root, "bench", "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode != 0 and says in res.stdout, res.stdout + res.stderr
    assert "=== CUDA tests" not in res.stdout
