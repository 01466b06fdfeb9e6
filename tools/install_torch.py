"""Install the pinned torch into the running Python's environment, the build that fits the machine.

    python tools/install_torch.py VERSION [--build auto|cpu|cuda] [--cpu-index URL]

`make install` runs it before the project itself (whose `torch>=` range the installed build then
satisfies). Standard library only: it runs in a new virtual environment.

- `cuda` (auto: an NVIDIA driver is present, `nvidia-smi` or /proc/driver/nvidia): `pip install
  torch==VERSION` from pip's configured indexes, which on Linux is PyPI's CUDA build.
- `cpu` (auto: no NVIDIA driver): first asks pip, without installing anything (`--dry-run
  --report`), what `torch==VERSION` resolves to with its own configuration. A CPU build (no
  `nvidia-*` package among what it would install: a local wheel, a mirror, a pip.conf pointing at
  PyTorch's CPU index) is installed as resolved. Otherwise torch comes from PyTorch's CPU wheel
  index (`--cpu-index`), which holds torch's dependencies too; where that index cannot be reached
  (a machine that reaches only its own registries), the configured build is installed after all,
  with a warning, rather than failing the install.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _pip(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", *args]
    return subprocess.run(command, check=False, text=True, capture_output=capture)


def nvidia_driver_present() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def resolves_to_cuda(requirement: str) -> bool | None:
    """Whether pip, as configured, would install CUDA packages for `requirement`; None if it
    cannot tell (resolution failed)."""
    done = _pip("install", "--dry-run", "--quiet", "--ignore-installed", "--report", "-", requirement, capture=True)
    if done.returncode != 0:
        return None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return None
    return report_installs_cuda(report)


def report_installs_cuda(report: dict) -> bool:
    """Whether a pip installation report (`--report`) installs a CUDA build of torch: a `+cuXXX`
    torch, or any of the nvidia-* packages PyPI's Linux torch wheels depend on."""
    installs = [item["metadata"] for item in report.get("install", [])]
    return any(m["name"].lower().startswith("nvidia-") for m in installs) or any(
        m["name"].lower() == "torch" and "+cu" in m["version"] for m in installs
    )

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version")
    parser.add_argument("--build", choices=("auto", "cpu", "cuda"), default=os.environ.get("TORCH_BUILD", "auto"))
    parser.add_argument("--cpu-index", default=os.environ.get("TORCH_CPU_INDEX", CPU_INDEX))
    args = parser.parse_args(argv)
    requirement = f"torch=={args.version}"
    build = args.build
    if build == "auto":
        build = "cuda" if nvidia_driver_present() else "cpu"
        print(f"torch: {'an NVIDIA driver' if build == 'cuda' else 'no NVIDIA driver'} found: the {build} build")
    if build == "cpu":
        cuda = resolves_to_cuda(requirement)
        if cuda is False:
            print(f"torch: pip's configuration provides a CPU build of {requirement}; installing it")
        else:
            print(f"torch: {requirement} from {args.cpu_index}")
            if _pip("install", "--quiet", requirement, "--index-url", args.cpu_index).returncode == 0:
                return 0
            print(
                f"torch: {args.cpu_index} could not be used; installing {requirement} as pip is configured "
                "(on Linux from PyPI that is the CUDA build, several GB)",
                file=sys.stderr,
            )
    return _pip("install", "--quiet", requirement).returncode


if __name__ == "__main__":
    raise SystemExit(main())
