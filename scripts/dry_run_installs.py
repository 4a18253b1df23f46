"""Dry-run pip installs of edgelvm's GPU installs per platform: which onnxruntime build, TensorRT and cuda-python each
one resolves to — nothing is installed and no GPU is needed (issue 26).

Why the requirements are evaluated here: pip evaluates environment markers (``platform_machine``, ...) for the
machine it runs on, not for ``--platform``, so ``pip install --platform manylinux_2_35_aarch64 .[tensorrt]`` on an
x86-64 build machine would pick the x86-64 branch of every marker. This script evaluates pyproject.toml's markers
for each target itself (``packaging``), hands pip the plain requirement strings with that target's wheel tags
(``--only-binary=:all:``: only wheels a target could install) and Python version, and checks pip's JSON report:
at most one onnxruntime build, and TensorRT / cuda-python on the CUDA major the target documents
(docs/hardware.md). pip's own index settings apply (its configuration files and environment).

    .venv/bin/python scripts/dry_run_installs.py              # every target
    .venv/bin/python scripts/dry_run_installs.py aarch64-jetpack6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
#: Distributions that all install the `onnxruntime` package directory: one per environment (onnxruntime #26996).
ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn")


@dataclass
class Target:
    """One documented install: the extras of edgelvm it takes, the commands docs/hardware.md adds, the CUDA major
    its TensorRT / cuda-python must be built for, and whether it has an onnxruntime from PyPI at all (Jetson: NVIDIA's
    JetPack wheel, installed from a file)."""

    machine: str
    python: str  # JetPack 6 is Ubuntu 22.04: Python 3.10, the one its python3-libnvinfer is built for
    glibc: tuple[int, int]  # Ubuntu 22.04: 2.35
    cuda_major: int
    extras: tuple[str, ...] = ("gpu", "tensorrt")
    added: tuple[str, ...] = ()
    onnxruntime: str | None = "onnxruntime"  # the one build expected from PyPI (None: none from PyPI)
    tensorrt_from_pypi: bool = True
    replaces_onnxruntime: bool = False  # the documented `pip uninstall onnxruntime && pip install onnxruntime-gpu`
    notes: list[str] = field(default_factory=list)


TARGETS: dict[str, Target] = {
    "x86_64-cuda12": Target("x86_64", "3.12", (2, 35), 12),
    "x86_64-cuda12-ort-gpu": Target(
        "x86_64",
        "3.12",
        (2, 35),
        12,
        added=("onnxruntime-gpu>=1.20",),
        onnxruntime="onnxruntime-gpu",
        replaces_onnxruntime=True,
    ),
    "x86_64-cuda13": Target(
        "x86_64",
        "3.12",
        (2, 35),
        13,
        extras=(),
        added=("tensorrt-cu13>=10.3,<12", "cuda-python>=13,<14", "nvidia-ml-py>=12.535"),
    ),
    "aarch64-jetpack6": Target(
        "aarch64",
        "3.10",
        (2, 35),
        12,
        onnxruntime=None,
        tensorrt_from_pypi=False,
        added=("cuda-python>=12.6,<13", "nvidia-ml-py>=12.535"),
    ),
}


def marker_environment(target: Target) -> dict[str, str]:
    env = default_environment()
    env.update(platform_machine=target.machine, platform_system="Linux", sys_platform="linux", os_name="posix",
               python_version=target.python, python_full_version=f"{target.python}.0",
               implementation_name="cpython", platform_python_implementation="CPython")  # fmt: skip
    return env


def requirements(target: Target, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """edgelvm's base dependencies and the target's extras, markers evaluated for the target, plus its added
    commands; with ``replaces_onnxruntime`` the CPU build is dropped as the documented uninstall does."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines = [(line, "") for line in project["dependencies"]]
    lines += [(line, extra) for extra in target.extras for line in project["optional-dependencies"][extra]]
    env = marker_environment(target)
    kept = []
    for line, extra in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        if target.replaces_onnxruntime and req.name == "onnxruntime":
            continue
        req.marker = None
        kept.append(str(req))
    return wheel_requirements(kept + list(target.added))


def wheel_requirements(lines: list[str]) -> list[str]:
    """``tensorrt-cuXX`` on PyPI is a source-only front-end requiring ``tensorrt_cuXX_libs`` and
    ``tensorrt_cuXX_bindings`` at its own version, and ``tensorrt_cuXX_libs`` is a source stub that fetches its wheel
    from NVIDIA's own package index while pip prepares it: a wheels-only resolution from PyPI can only ask for the
    bindings (same range), whose version is then the TensorRT that `pip install tensorrt-cuXX` would pick."""
    out = []
    for line in lines:
        req = Requirement(line)
        if req.name.startswith("tensorrt-cu") and req.name.count("-") == 1:
            out.append(f"{req.name}-bindings{req.specifier}")
        else:
            out.append(line)
    return out


def platform_tags(target: Target) -> list[str]:
    """pip (23.x) does not expand ``manylinux_2_35`` to the older tags a glibc 2.35 system also runs: list them."""
    major, minor = target.glibc
    tags = [f"manylinux_{major}_{m}_{target.machine}" for m in range(minor, 16, -1)]
    return [*tags, f"manylinux2014_{target.machine}"]


def check_report(report: dict, target: Target) -> tuple[dict[str, str], list[str]]:
    """(name → version of what resolved, problems): one onnxruntime build at most (the expected one), TensorRT and
    cuda-python / cuda-bindings on the target's CUDA major, TensorRT within 10.x-11.x."""
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in report.get("install", [])}  # fmt: skip
    problems = []
    builds = [name for name in ORT_BUILDS if name in resolved]
    expected = [target.onnxruntime] if target.onnxruntime else []
    if builds != expected:
        problems.append(f"onnxruntime builds {builds or 'none'}, expected {expected or 'none'}")
    trt = {name: version for name, version in resolved.items() if name.startswith("tensorrt")}
    if target.tensorrt_from_pypi:
        suffix = f"-cu{target.cuda_major}"
        if not trt:
            problems.append("no TensorRT package resolved")
        for name, version in trt.items():
            major = int(version.split(".")[0])
            if suffix not in name or not 10 <= major <= 11:
                problems.append(f"{name} {version}: not TensorRT 10.x/11.x for CUDA {target.cuda_major}")
    elif trt:
        problems.append(f"TensorRT from PyPI {trt} where the platform's comes from JetPack")
    for name in ("cuda-python", "cuda-bindings"):
        if name not in resolved:
            problems.append(f"no {name} resolved")
        elif int(resolved[name].split(".")[0]) != target.cuda_major:
            problems.append(f"{name} {resolved[name]} is not built for CUDA {target.cuda_major}")
    return resolved, problems


def dry_run(target: Target) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"  # --target: pip 23 accepts --platform only with it (nothing is written)
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                   "--only-binary=:all:", "--python-version", target.python, "--report", str(report),
                   "--target", str(Path(tmp) / "target")]  # fmt: skip
        for tag in platform_tags(target):
            command += ["--platform", tag]
        subprocess.run(command + requirements(target), check=True)
        return json.loads(report.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)} (default: all)")
    args = parser.parse_args(argv)
    if unknown := [name for name in args.targets if name not in TARGETS]:
        parser.error(f"unknown target(s) {', '.join(unknown)}: pick from {', '.join(TARGETS)}")
    failed = False
    for name in args.targets or TARGETS:
        target = TARGETS[name]
        tags = f"{platform_tags(target)[0]} and older"
        print(f"== {name}: Python {target.python}, {tags}; pip install {' '.join(requirements(target))}")
        try:
            report = dry_run(target)
            resolved, problems = check_report(report, target)
        except subprocess.CalledProcessError as err:
            print(f"FAIL: pip could not resolve it (exit {err.returncode})")
            failed = True
            continue
        picked = [n for n in resolved if n.startswith(("onnxruntime", "tensorrt", "cuda-", "nvidia-"))]
        origin = {item["metadata"]["name"].lower().replace("_", "-"): item["download_info"]["url"].split("/")[-1]
                  for item in report.get("install", [])}  # fmt: skip
        print("resolved:", ", ".join(f"{n} {resolved[n]}" for n in sorted(picked)))
        print("files:", ", ".join(origin[n] for n in sorted(picked)))
        local = sorted(
            n for n, item in zip(resolved, report["install"]) if item["download_info"]["url"].startswith("file:")
        )
        print(f"{len(resolved)} distributions, from a local index: {', '.join(local) or 'none'}")
        print("OK" if not problems else "FAIL: " + "; ".join(problems))
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
