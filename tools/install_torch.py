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
  with a warning, rather than failing the install. When the dry run itself fails (its stderr's end
  is shown), torch comes from the CPU index, and without that index the install fails: pip's
  configuration just failed to resolve it.
  Where the environment already holds a CUDA build of torch VERSION (a `+cu` version, or nvidia-*
  packages installed), torch is reinstalled from the CPU choice (`--force-reinstall --no-deps`):
  pip would otherwise keep it as satisfying `torch==VERSION`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STDERR_TAIL = 15  # lines of a failed dry run's stderr shown
REINSTALL = ("--force-reinstall", "--no-deps")


def _pip(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", *args]
    return subprocess.run(command, check=False, text=True, capture_output=capture)


def nvidia_driver_present() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def resolves_to_cuda(requirement: str) -> bool | None:
    """Whether pip, as configured, would install CUDA packages for `requirement`; None if it
    cannot tell (resolution failed)."""
    done = _pip(
        "install", "--dry-run", "--quiet", "--ignore-installed", "--report", "-", requirement, capture=True
    )
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-STDERR_TAIL:]
        print(
            f"torch: the dry run `pip install --dry-run --report - {requirement}` failed "
            f"(exit status {done.returncode})" + (": its stderr ends with" if tail else ", saying nothing"),
            file=sys.stderr,
        )
        for line in tail:
            print(f"    {line}", file=sys.stderr)
        return None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        print("torch: the dry run's report is not JSON; taking torch from the CPU index", file=sys.stderr)
        return None
    return report_installs_cuda(report)


def report_installs_cuda(report: dict) -> bool:
    """Whether a pip installation report (`--report`) installs a CUDA build of torch: a `+cuXXX`
    torch, or any of the nvidia-* packages PyPI's Linux torch wheels depend on."""
    installs = [item["metadata"] for item in report.get("install", [])]
    return any(m["name"].lower().startswith("nvidia-") for m in installs) or any(
        m["name"].lower() == "torch" and "+cu" in m["version"] for m in installs
    )


def installed_cuda_build(version: str, dists: list[tuple[str, str]] | None = None) -> str | None:
    """What shows that this environment (the running interpreter's) holds a CUDA build of torch
    `version`: its `+cu` version, or the nvidia-* packages installed; None when it does not.
    `dists`, (name, version) pairs, stands in for the installed distributions in tests."""
    if dists is None:
        dists = [(d.metadata["Name"] or "", d.version) for d in importlib.metadata.distributions()]
    torch = next((v for n, v in dists if n.lower() == "torch"), None)
    if torch is None or torch.split("+")[0] != version.split("+")[0]:
        return None  # absent, or another version, which the install replaces anyway
    if "+cu" in torch:
        return f"torch {torch}"
    nvidia = sorted({n for n, _ in dists if n.lower().startswith("nvidia-")})
    if nvidia:
        return f"torch {torch} with {len(nvidia)} nvidia-* package{'s' if len(nvidia) > 1 else ''}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version")
    parser.add_argument(
        "--build", choices=("auto", "cpu", "cuda"), default=os.environ.get("TORCH_BUILD", "auto")
    )
    parser.add_argument("--cpu-index", default=os.environ.get("TORCH_CPU_INDEX", CPU_INDEX))
    args = parser.parse_args(argv)
    requirement = f"torch=={args.version}"
    build = args.build
    if build == "auto":
        build = "cuda" if nvidia_driver_present() else "cpu"
        print(
            f"torch: {'an NVIDIA driver' if build == 'cuda' else 'no NVIDIA driver'} found: the {build} build"
        )
    if build != "cpu":
        return _pip("install", "--quiet", requirement).returncode
    cuda = resolves_to_cuda(requirement)
    present = installed_cuda_build(args.version)
    reinstall: tuple[str, ...] = ()
    if present:
        reinstall = REINSTALL
        print(
            f"torch: this environment holds a CUDA build ({present}); reinstalling torch as the CPU "
            "build (--force-reinstall --no-deps; nvidia-* packages installed stay, unused)"
        )
    if cuda is False:
        print(f"torch: pip's configuration provides a CPU build of {requirement}; installing it")
        return _pip("install", "--quiet", *reinstall, requirement).returncode
    print(f"torch: {requirement} from {args.cpu_index}")
    done = _pip("install", "--quiet", *reinstall, requirement, "--index-url", args.cpu_index)
    if done.returncode == 0:
        return 0
    if cuda is None:
        print(
            f"torch: {args.cpu_index} could not be used either; not installing {requirement} as pip is "
            "configured, whose dry run failed above (TORCH_CPU_INDEX names another CPU index, "
            "TORCH_BUILD=cuda takes the configured build)",
            file=sys.stderr,
        )
        return done.returncode or 1
    print(
        f"torch: {args.cpu_index} could not be used; installing {requirement} as pip is configured "
        "(on Linux from PyPI that is the CUDA build, several GB)",
        file=sys.stderr,
    )
    return _pip("install", "--quiet", requirement).returncode


if __name__ == "__main__":
    raise SystemExit(main())
