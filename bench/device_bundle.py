"""Build ``.gpu/site.tar.xz``: every package this project needs that the GPU machine's image lacks,
for that machine's Python, slimmed and packed small enough to travel with a device call.

The set is resolved from pyproject's dependencies for the target Python and platform, at the
versions this venv has (so Ray on the GPU is the Ray the tests ran), minus what the image
already holds (the device tool's KINDS.md lists it; ``--image-has`` names another list).
Unpacked with ``pip install --target``, then slimmed: Ray's Java jars and RLlib, the dashboard's
source maps, MLflow's UI bundle, py-spy, caches. Packed with ``xz -9``; refused past the carry
limit with the working tree counted in. A change of pins rebuilds it: run the script again.

    python bench/device_bundle.py                 # for the GPU machine (CPython 3.12)
    python bench/device_bundle.py --python-version 3.11 --image-has torch,torchvision,...

On the device (what ``--print-unpack`` prints): unpack into /tmp/site, put it on PYTHONPATH,
install this project without dependencies, and ``swav-ray`` is the command users run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64
PLATFORMS = ["manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "linux_x86_64"]
# Paths inside the unpacked site that no run here uses (Java workers, RLlib, browser source maps,
# MLflow's web UI: the server's API stays; py-spy's profiler binary).
SLIM = ["ray/jars", "ray/rllib", "mlflow/server/js", "bin/py-spy", "py_spy*"]
SLIM_SUFFIXES = (".map", ".pyc")
# The project itself runs from the repository (on PYTHONPATH, as Ray's workers inherit it);
# `swav-ray` is a two-line launcher, so no build backend is needed there.
UNPACK = ("mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && "
          "export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH && "
          "printf '#!/usr/bin/env python3\\nimport sys\\nfrom orchestration.cli import main\\n"
          "sys.exit(main())\\n' > /tmp/site/bin/swav-ray && chmod +x /tmp/site/bin/swav-ray && "
          "swav-ray --help >/dev/null")


def image_packages(names: str | None) -> set[str]:
    """What the GPU machine's image holds: KINDS.md's list, or ``names`` (comma-separated)."""
    if names is None:
        kinds = Path("/work/.library/device/KINDS.md")
        text = kinds.read_text() if kinds.exists() else ""
        found = re.search(r"Packages: (.*?)\.\s*$", text, re.M)
        if not found:
            sys.exit("device_bundle: no package list in KINDS.md; pass --image-has")
        names = found.group(1)
    return {_canonical(n) for n in names.split(",") if n.strip()}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def resolve(python_version: str, image: set[str], work: Path) -> dict[str, str]:
    """name -> version of pyproject's dependencies that the image lacks and of theirs, for the
    target Python, at this venv's versions where it has the package."""
    deps = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"] if _canonical(re.split(r"[\[<>=!~ ;]", d)[0]) not in image]
    pins = work / "constraints.txt"
    pins.write_text("".join(f"{d.metadata['Name']}=={d.version}\n"
                            for d in metadata.distributions()
                            if d.metadata["Name"] and _canonical(d.metadata["Name"]) not in image
                            and "+" not in d.version))
    report = work / "report.json"
    command = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
               "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", "--target", str(work / "unused"),
               *[f"--platform={p}" for p in PLATFORMS], "-c", str(pins),
               "--report", str(report), *deps]
    subprocess.run(command, check=True)
    items = json.loads(report.read_text())["install"]
    return {_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def build(python_version: str, image: set[str], out: Path, work: Path,
          preset: int = 9) -> list[str]:
    """The packed site; returns the packages it holds."""
    wanted = {n: v for n, v in resolve(python_version, image, work).items() if n not in image}
    wheels, site = work / "wheels", work / "site"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", python_version,
                    "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
                    "-d", str(wheels), *[f"{n}=={v}" for n, v in sorted(wanted.items())]],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-compile", "--only-binary=:all:", "--python-version", python_version,
                    "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
                    "--target", str(site), *map(str, sorted(wheels.iterdir()))], check=True)
    for script in (site / "bin").glob("*"):  # (pip wrote this machine's interpreter in them)
        text = script.read_bytes()
        if text.startswith(b"#!"):
            script.write_bytes(b"#!/usr/bin/env python3\n" + text.split(b"\n", 1)[1])
    for pattern in SLIM:
        for path in site.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in list(site.rglob("*")):
        if path.is_dir() and path.name == "__pycache__":
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.suffix in SLIM_SUFFIXES:
            path.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz", preset=preset) as tar:
        for path in sorted(site.iterdir()):
            tar.add(path, arcname=path.name)
    return [f"{n}=={v}" for n, v in sorted(wanted.items())]


def tree_bytes() -> int:
    """What the working tree sends with every device call (tracked files)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    paths = [ROOT / f.decode() for f in files if f]
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="the device's Python (3.12)")
    parser.add_argument("--image-has", default=None,
                        help="comma-separated packages the target already has (default: the "
                             "GPU image's list in the device tool's KINDS.md)")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu" / "site.tar.xz")
    parser.add_argument("--preset", type=int, default=9, help="xz's preset (9: smallest)")
    parser.add_argument("--print-unpack", action="store_true",
                        help="print the command that unpacks it on the device, and exit")
    args = parser.parse_args()
    if args.print_unpack:
        print(UNPACK)
        return 0
    with tempfile.TemporaryDirectory(prefix="device-bundle-") as tmp:
        packages = build(args.python_version, image_packages(args.image_has), args.out,
                         Path(tmp), args.preset)
    packed, tree = args.out.stat().st_size, tree_bytes()
    mib = (packed + tree) / 2**20
    print(f"{len(packages)} packages for CPython {args.python_version}: {' '.join(packages)}")
    print(f"{args.out}: {packed / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB) "
          f"{mib:.1f} MiB travel (limit {LIMIT_MIB})")
    print(f"on the device: {UNPACK}")
    if mib >= LIMIT_MIB:
        print(f"device_bundle: {mib:.1f} MiB is over the carry limit of {LIMIT_MIB} MiB",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
