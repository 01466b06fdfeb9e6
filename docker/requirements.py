"""Print the requirements of an image: the project's dependencies (for the api image without
the worker-only torch stack), plus the optional-dependency groups named on the command line.

The API never imports torch, diffusers, transformers or accelerate (tests/service/test_packaging.py checks it), but
the package declares them, because the same distribution is the worker. The api image therefore
installs the project with `pip install --no-deps .` and its real dependencies from this list,
several GB smaller. The worker image installs torch from PyTorch's CUDA index first, then
this list with `--worker` (everything but torch, which is then already satisfied), so that
both images install dependencies in a layer of their own, before the source is copied.
Standard library only: it runs before anything is installed.

    python docker/requirements.py [--worker] [pyproject.toml] [extra ...] > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

WORKER_ONLY = frozenset({"torch", "diffusers", "transformers", "accelerate"})


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def image_requirements(pyproject: Path, extras: list[str], *, worker: bool = False) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    requirements = list(project["dependencies"])
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; known: {', '.join(sorted(optional))}")
        requirements += optional[extra]
    dropped = {"torch"} if worker else WORKER_ONLY
    return [r for r in requirements if requirement_name(r) not in dropped]


def main(argv: list[str]) -> int:
    args = [a for a in argv if a]
    worker = "--worker" in args
    args = [a for a in args if a != "--worker"]
    pyproject = Path(args.pop(0)) if args and args[0].endswith(".toml") else Path("pyproject.toml")
    extras = [e.strip() for a in args for e in a.split(",") if e.strip()]
    print("\n".join(image_requirements(pyproject, extras, worker=worker)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
