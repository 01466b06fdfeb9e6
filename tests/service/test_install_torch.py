"""The install's choice of torch build (tools/install_torch.py) and the version the Makefile pins."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("install_torch", ROOT / "tools" / "install_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(*packages: tuple[str, str]) -> dict:
    return {"install": [{"metadata": {"name": name, "version": version}} for name, version in packages]}


def test_a_cuda_resolution_is_told_from_its_packages():
    tool = _tool()
    cpu = _report(("torch", "2.13.0+cpu"), ("sympy", "1.14.0"), ("filelock", "4.3.1"))
    pypi_linux = _report(("torch", "2.13.0"), ("nvidia-cublas-cu12", "12.8.4.1"), ("triton", "3.5.0"))
    cuda_index = _report(("torch", "2.13.0+cu128"), ("sympy", "1.14.0"))
    assert tool.report_installs_cuda(cpu) is False
    assert tool.report_installs_cuda(pypi_linux) is True
    assert tool.report_installs_cuda(cuda_index) is True
    assert tool.report_installs_cuda({"install": []}) is False


def test_the_makefile_installs_the_torch_pyproject_pins():
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    dry = subprocess.run(
        ["make", "-n", "-B", "install", "VENV=/nonexistent-venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(line for line in dry.splitlines() if "install_torch.py" in line)
    assert f"install_torch.py {pin} --build auto " in line
    forced = subprocess.run(
        ["make", "-n", "-B", "install", "VENV=/nonexistent-venv", "TORCH_BUILD=cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--build cpu" in forced


# -- main()'s decisions, pip stubbed ------------------------------------------------------------


class _Pip:
    """Stands in for the module's `_pip`: records each call, answers the dry run with `report`
    (or fails it), and fails the installs whose arguments hold one of `failing`."""

    def __init__(self, report: dict | None, failing: tuple[str, ...] = (), dry_stderr: str = "") -> None:
        self.report = report
        self.failing = failing
        self.dry_stderr = dry_stderr
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
        if "--dry-run" in args:
            assert capture
            if self.report is None:
                return subprocess.CompletedProcess(args, 1, "", self.dry_stderr)
            return subprocess.CompletedProcess(args, 0, json.dumps(self.report), "")
        self.calls.append(args)
        rc = 1 if any(f in args for f in self.failing) else 0
        return subprocess.CompletedProcess(args, rc, "", "")


CPU = _report(("torch", "2.13.0+cpu"), ("sympy", "1.14.0"))
PYPI_CUDA = _report(("torch", "2.13.0"), ("nvidia-cublas-cu12", "12.8.4.1"))
INDEX = "https://cpu.example/whl"


def _main(monkeypatch, pip: _Pip, *argv: str, driver: bool = False, installed=None):
    tool = _tool()
    monkeypatch.setattr(tool, "_pip", pip)
    monkeypatch.setattr(tool, "nvidia_driver_present", lambda: driver)
    monkeypatch.setattr(tool, "installed_cuda_build", lambda version: installed)
    return tool.main(["2.13.0", "--cpu-index", INDEX, *argv])


def test_cpu_from_the_configuration_is_one_plain_install(monkeypatch, capsys):
    pip = _Pip(CPU)
    assert _main(monkeypatch, pip, "--build", "cpu") == 0
    assert pip.calls == [("install", "--quiet", "torch==2.13.0")]
    assert "provides a CPU build" in capsys.readouterr().out


def test_cuda_from_the_configuration_takes_the_cpu_index(monkeypatch):
    pip = _Pip(PYPI_CUDA)
    assert _main(monkeypatch, pip, "--build", "cpu") == 0
    assert pip.calls == [("install", "--quiet", "torch==2.13.0", "--index-url", INDEX)]


def test_an_unreachable_cpu_index_falls_back_with_a_warning(monkeypatch, capsys):
    pip = _Pip(PYPI_CUDA, failing=(INDEX,))
    assert _main(monkeypatch, pip, "--build", "cpu") == 0
    assert pip.calls == [
        ("install", "--quiet", "torch==2.13.0", "--index-url", INDEX),
        ("install", "--quiet", "torch==2.13.0"),
    ]
    err = capsys.readouterr().err
    assert f"{INDEX} could not be used" in err and "CUDA build" in err


def test_a_failed_dry_run_says_so_with_its_stderr(monkeypatch, capsys):
    stderr = (
        "\n".join(f"line {i}" for i in range(40)) + "\nERROR: No matching distribution for torch==2.13.0\n"
    )
    pip = _Pip(None, dry_stderr=stderr)
    assert _main(monkeypatch, pip, "--build", "cpu") == 0
    assert pip.calls == [("install", "--quiet", "torch==2.13.0", "--index-url", INDEX)]
    err = capsys.readouterr().err
    assert "dry run" in err and "failed (exit status 1)" in err
    assert "No matching distribution" in err and "line 39" in err and "line 10\n" not in err

    # Neither the configuration nor the CPU index: the install fails rather than trying the
    # configuration that could not resolve torch a moment ago.
    pip = _Pip(None, failing=(INDEX,), dry_stderr="ERROR: boom\n")
    assert _main(monkeypatch, pip, "--build", "cpu") == 1
    assert pip.calls == [("install", "--quiet", "torch==2.13.0", "--index-url", INDEX)]
    err = capsys.readouterr().err
    assert "ERROR: boom" in err and "could not be used either" in err


def test_cuda_build_is_a_plain_install(monkeypatch):
    pip = _Pip(CPU)  # never asked: no dry run for the CUDA build
    assert _main(monkeypatch, pip, "--build", "cuda") == 0
    assert pip.calls == [("install", "--quiet", "torch==2.13.0")]


def test_auto_follows_the_nvidia_driver(monkeypatch, capsys):
    pip = _Pip(PYPI_CUDA)
    assert _main(monkeypatch, pip, "--build", "auto", driver=True) == 0
    assert pip.calls == [("install", "--quiet", "torch==2.13.0")]
    assert "an NVIDIA driver found: the cuda build" in capsys.readouterr().out
    pip = _Pip(PYPI_CUDA)
    assert _main(monkeypatch, pip, "--build", "auto", driver=False) == 0
    assert pip.calls == [("install", "--quiet", "torch==2.13.0", "--index-url", INDEX)]
    assert "no NVIDIA driver found: the cpu build" in capsys.readouterr().out


def test_a_cuda_build_already_installed_is_replaced_in_cpu_mode(monkeypatch, capsys):
    present = "torch 2.13.0 with 3 nvidia-* packages"
    pip = _Pip(PYPI_CUDA)
    assert _main(monkeypatch, pip, "--build", "cpu", installed=present) == 0
    assert pip.calls == [
        ("install", "--quiet", "--force-reinstall", "--no-deps", "torch==2.13.0", "--index-url", INDEX)
    ]
    assert present in capsys.readouterr().out
    pip = _Pip(CPU)
    assert _main(monkeypatch, pip, "--build", "cpu", installed=present) == 0
    assert pip.calls == [("install", "--quiet", "--force-reinstall", "--no-deps", "torch==2.13.0")]


def test_an_installed_cuda_build_is_told_from_its_distributions():
    tool = _tool()
    found = tool.installed_cuda_build
    assert found("2.13.0", [("torch", "2.13.0+cu128"), ("numpy", "2.0")]) == "torch 2.13.0+cu128"
    assert "nvidia-*" in found("2.13.0", [("torch", "2.13.0"), ("nvidia-cublas-cu12", "12.8")])
    assert found("2.13.0", [("torch", "2.13.0+cpu"), ("numpy", "2.0")]) is None
    assert found("2.13.0", [("torch", "2.12.0+cu128")]) is None  # another version: replaced anyway
    assert found("2.13.0", [("numpy", "2.0")]) is None
    assert found("0.0.1") is None  # this environment, read: no torch 0.0.1 in it
