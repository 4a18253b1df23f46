"""Device profiles as data: one JSON file per device under ``edgelvm/devices/profiles/``.

Why data and not code: the numbers (memory, bandwidth, precisions) change with every module revision and JetPack
release, and users own devices we never listed. A profile is a JSON file anyone can copy and edit; directories in
``EDGELVM_DEVICE_PROFILES`` (``os.pathsep``-separated) or passed as ``profiles_dir`` are read after the built-in
ones, and a user file with the same ``name`` replaces the built-in profile. Every number carries its source in the
``sources`` field; numbers that were not checked against the datasheet say "unverified" there.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelvm.errors import EdgeLVMError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).with_name("profiles")
ENV_VAR = "EDGELVM_DEVICE_PROFILES"
GIB = 1 << 30
#: Precision names a profile may list (weight / compute formats TensorRT can build for).
KNOWN_PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8", "fp8", "int4", "fp4")
KINDS = ("jetson", "discrete")


class ProfileError(EdgeLVMError):
    """A device profile file is malformed, or a profile name is unknown."""


@dataclass(frozen=True)
class DeviceProfile:
    """One device. Memory in GiB (DRAM capacities are binary), bandwidth in GB/s (10^9 bytes/s, as datasheets)."""

    name: str
    display_name: str
    kind: str  # "jetson" (memory shared with the OS and CPU) or "discrete"
    memory_gib: float
    usable_memory_gib: float  # what one inference process may use; see the profile's sources for the assumption
    memory_bandwidth_gbps: float
    compute_capability: str  # "8.7"
    int8_dense_tops: float | None
    fp16_dense_tflops: float | None
    dla_count: int
    precisions: tuple[str, ...]
    jetpack: str | None
    tensorrt: str | None
    sources: dict[str, str]
    notes: str = ""
    path: str = field(default="", compare=False)

    @property
    def total_memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def usable_memory_bytes(self) -> int:
        return int(self.usable_memory_gib * GIB)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbps * 1e9

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "kind": self.kind,
            "memory_gib": self.memory_gib,
            "usable_memory_gib": self.usable_memory_gib,
            "memory_bandwidth_gbps": self.memory_bandwidth_gbps,
            "compute_capability": self.compute_capability,
            "int8_dense_tops": self.int8_dense_tops,
            "fp16_dense_tflops": self.fp16_dense_tflops,
            "dla_count": self.dla_count,
            "precisions": list(self.precisions),
            "jetpack": self.jetpack,
            "tensorrt": self.tensorrt,
            "notes": self.notes,
            "sources": dict(self.sources),
        }


# (field, accepted types, required). ``None`` in the types tuple means the field may be JSON null.
_NUM = (int, float)
_SCHEMA: list[tuple[str, tuple[Any, ...], bool]] = [
    ("name", (str,), True),
    ("display_name", (str,), True),
    ("kind", (str,), True),
    ("memory_gib", _NUM, True),
    ("usable_memory_gib", _NUM, True),
    ("memory_bandwidth_gbps", _NUM, True),
    ("compute_capability", (str,), True),
    ("int8_dense_tops", (*_NUM, type(None)), False),
    ("fp16_dense_tflops", (*_NUM, type(None)), False),
    ("dla_count", (int,), False),
    ("precisions", (list,), True),
    ("jetpack", (str, type(None)), False),
    ("tensorrt", (str, type(None)), False),
    ("notes", (str,), False),
    ("sources", (dict,), True),
]
_EXAMPLE = BUILTIN_DIR / "jetson-orin-nano-8gb.json"


def _bad(path: Path, field_name: str, problem: str, fix: str) -> ProfileError:
    return ProfileError(f"field {field_name!r}: {problem}", where=path, fix=fix)


def parse_profile(data: Any, path: Path) -> DeviceProfile:
    """Validate one profile's JSON object; every error names the file, the field and the fix."""
    if not isinstance(data, dict):
        raise ProfileError("top level must be a JSON object", where=path, fix=f"copy the layout of {_EXAMPLE}")
    for name, types, required in _SCHEMA:
        if name not in data:
            if required:
                raise _bad(path, name, "is missing", f"add it (see {_EXAMPLE} for every field and its meaning)")
            continue
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _bad(path, name, f"must be {wanted}, got {value!r}", f"write a {wanted} (see {_EXAMPLE})")
    unknown = sorted(set(data) - {name for name, _, _ in _SCHEMA})
    if unknown:
        raise _bad(
            path,
            unknown[0],
            "is not a profile field",
            f"remove it or fix its spelling; fields: {', '.join(n for n, _, _ in _SCHEMA)}",
        )
    if data["name"] != path.stem:
        raise _bad(
            path,
            "name",
            f"{data['name']!r} differs from the file name {path.stem!r}",
            f"rename the file to {data['name']}.json or set name to {path.stem!r}",
        )
    if data["kind"] not in KINDS:
        raise _bad(
            path,
            "kind",
            f"must be one of {', '.join(KINDS)}, got {data['kind']!r}",
            "use 'jetson' for memory shared with the OS, 'discrete' for a GPU with its own memory",
        )
    for name in ("memory_gib", "usable_memory_gib", "memory_bandwidth_gbps"):
        if data[name] <= 0:
            raise _bad(path, name, f"must be > 0, got {data[name]}", "write the datasheet figure")
    if data["usable_memory_gib"] > data["memory_gib"]:
        raise _bad(
            path,
            "usable_memory_gib",
            f"{data['usable_memory_gib']} exceeds memory_gib {data['memory_gib']}",
            "usable memory is total memory minus what the OS / driver keeps",
        )
    cc = data["compute_capability"].split(".")
    if len(cc) != 2 or not all(part.isdigit() for part in cc):
        raise _bad(
            path,
            "compute_capability",
            f"must look like '8.7', got {data['compute_capability']!r}",
            "see https://developer.nvidia.com/cuda-gpus",
        )
    bad_precisions = [p for p in data["precisions"] if p not in KNOWN_PRECISIONS]
    if bad_precisions or not data["precisions"]:
        raise _bad(
            path,
            "precisions",
            f"unknown or empty: {bad_precisions or data['precisions']}",
            f"list some of: {', '.join(KNOWN_PRECISIONS)}",
        )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data["sources"].items()):
        raise _bad(
            path,
            "sources",
            "must map field names to source strings",
            'write e.g. {"memory_gib": "<datasheet name, URL>"}; say \'unverified\' where you could not check',
        )
    return DeviceProfile(
        name=data["name"],
        display_name=data["display_name"],
        kind=data["kind"],
        memory_gib=float(data["memory_gib"]),
        usable_memory_gib=float(data["usable_memory_gib"]),
        memory_bandwidth_gbps=float(data["memory_bandwidth_gbps"]),
        compute_capability=data["compute_capability"],
        int8_dense_tops=data.get("int8_dense_tops"),
        fp16_dense_tflops=data.get("fp16_dense_tflops"),
        dla_count=int(data.get("dla_count", 0)),
        precisions=tuple(data["precisions"]),
        jetpack=data.get("jetpack"),
        tensorrt=data.get("tensorrt"),
        sources=dict(data["sources"]),
        notes=data.get("notes", ""),
        path=str(path),
    )


def read_profile_file(path: str | Path) -> DeviceProfile:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileError(f"cannot read the profile ({err})", where=path, fix="check the file's permissions") from None
    except json.JSONDecodeError as err:
        raise ProfileError(
            f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
            where=path,
            fix="fix the JSON syntax (a trailing comma or a missing quote is the usual cause)",
        ) from None
    return parse_profile(data, path)


def profile_dirs(profiles_dir: str | Path | None = None) -> list[Path]:
    """Built-in directory first, then ``EDGELVM_DEVICE_PROFILES`` entries, then ``profiles_dir`` (later wins)."""
    dirs = [BUILTIN_DIR]
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry.strip()).expanduser())
    if profiles_dir is not None:
        dirs.append(Path(profiles_dir).expanduser())
    for directory in dirs[1:]:
        if not directory.is_dir():
            raise ProfileError(
                "profiles directory does not exist",
                where=directory,
                fix=f"create it, or fix {ENV_VAR} / --profiles-dir",
            )
    return dirs


def _all_profiles(profiles_dir: str | Path | None) -> dict[str, DeviceProfile]:
    profiles: dict[str, DeviceProfile] = {}
    for directory in profile_dirs(profiles_dir):
        for path in sorted(directory.glob("*.json")):
            profile = read_profile_file(path)
            if profile.name in profiles:
                log.info("device profile %s from %s replaces %s", profile.name, path, profiles[profile.name].path)
            profiles[profile.name] = profile
    return profiles


def list_profiles(profiles_dir: str | Path | None = None) -> list[DeviceProfile]:
    """Every known profile, Jetsons first, each group by usable memory."""
    return sorted(_all_profiles(profiles_dir).values(), key=lambda p: (p.kind != "jetson", p.usable_memory_gib, p.name))


def load_profile(name: str, profiles_dir: str | Path | None = None) -> DeviceProfile:
    """The profile called ``name``; an unknown name lists the known ones and the closest match."""
    profiles = _all_profiles(profiles_dir)
    key = name.strip().lower()
    if key in profiles:
        return profiles[key]
    close = difflib.get_close_matches(key, list(profiles), n=3, cutoff=0.5)
    close += [n for n in profiles if key and key in n and n not in close]
    hint = f"did you mean {' or '.join(repr(c) for c in close[:3])}? " if close else ""
    raise ProfileError(
        f"unknown device profile {name!r}",
        where="device",
        fix=f"{hint}known profiles: {', '.join(sorted(profiles))}; add your own as NAME.json in a directory named by "
        f"{ENV_VAR} or --profiles-dir",
    )
