"""The install's choice of torch build (tools/install_torch.py) and the version the Makefile pins."""

from __future__ import annotations

import importlib.util
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
        ["make", "-n", "-B", "install", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True, text=True, check=True
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
