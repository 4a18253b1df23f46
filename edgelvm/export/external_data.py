"""Initializers written straight to an ONNX external-data file, one tensor at a time, and shared between graphs.

Why: at real sizes the decoder's weights must not exist twice in memory (numpy arrays, then protobuf copies of them,
then a save), and a bundle must not store them twice on disk. The portable and the fused decoder hold the same
matrices in the same ``[in, out]`` layout, and a tied LM head is the embedding table: a :class:`ContentIndex` knows
where each tensor's bytes already lie in the bundle (by digest), and a :class:`WeightWriter` points a new graph's
initializer there instead of writing the bytes again. ONNX external data may point several graphs at one file
(``location`` + ``offset`` + ``length``); ONNX Runtime and TensorRT's parser read it relative to the graph's folder.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Offsets of large tensors are multiples of this, so that ONNX Runtime can memory-map them (onnx ExternalData.md).
ALIGNMENT = 4096
#: Tensors below this stay inside the graph's protobuf (norm weights, small tables): not worth a file region.
INLINE_BYTES = 1024
#: Tensors below this are not indexed or shared (many small tensors share bytes by chance, e.g. all-ones norms).
SHARE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Region:
    """Where a tensor's bytes lie: a file of the bundle (relative name), an offset and a length."""

    file: str
    offset: int
    length: int


def new_hasher() -> Any:
    return hashlib.blake2b(digest_size=20)


def digest(data: memoryview | bytes) -> str:
    hasher = new_hasher()
    hasher.update(data)
    return hasher.hexdigest()


class ContentIndex:
    """Digest → :class:`Region` of every large external tensor already written to a bundle folder."""

    def __init__(self) -> None:
        self._regions: dict[tuple[str, int], Region] = {}

    def __len__(self) -> int:
        return len(self._regions)

    def add(self, data: memoryview | bytes, region: Region) -> None:
        self.add_digest(digest(data), region)

    def add_digest(self, hexdigest: str, region: Region) -> None:
        """Record bytes hashed elsewhere (e.g. a table written in chunks with :func:`new_hasher`)."""
        if region.length >= SHARE_BYTES:
            self._regions.setdefault((hexdigest, region.length), region)

    def refers_to(self, file: str) -> bool:
        return any(region.file == file for region in self._regions.values())

    def find(self, data: memoryview | bytes, length: int) -> Region | None:
        if length < SHARE_BYTES:
            return None
        return self.find_digest(digest(data), length)

    def find_digest(self, hexdigest: str, length: int) -> Region | None:
        return self._regions.get((hexdigest, length)) if length >= SHARE_BYTES else None


def external_info(tensor: Any) -> Region | None:
    """The external-data region of a ``TensorProto``, or None if its data is inline."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    fields = {entry.key: entry.value for entry in tensor.external_data}
    return Region(fields["location"], int(fields.get("offset", 0)), int(fields.get("length", 0)))


class WeightWriter:
    """Makes ``TensorProto`` initializers whose bytes go to ``data_path`` as they come (aligned), or to nowhere
    when the index already holds the same bytes. Use as a context manager; the file is created on first write."""

    def __init__(self, data_path: Path, index: ContentIndex | None = None, location: str | None = None) -> None:
        self.data_path = data_path
        self.location = location or data_path.name  # the name graphs use (data_path may be a temporary one)
        self.index = index
        self._handle: Any = None
        self._offset = 0
        self.written_bytes = 0
        self.shared_bytes = 0

    def __enter__(self) -> WeightWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def tensor(self, name: str, array: np.ndarray) -> Any:
        from onnx import TensorProto, helper, numpy_helper

        array = np.ascontiguousarray(array)  # a transposed view becomes one tensor-sized temporary, freed on return
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        proto = TensorProto()
        proto.name = name
        proto.data_type = int(helper.np_dtype_to_tensor_dtype(array.dtype))
        proto.dims.extend(array.shape)
        point_at(proto, self.place(memoryview(array).cast("B")))
        return proto

    def place(self, data: memoryview) -> Region:
        """Where these bytes lie in the bundle: a region the index already holds, or one appended to this file."""
        region = self.index.find(data, data.nbytes) if self.index is not None else None
        if region is not None:
            self.shared_bytes += data.nbytes
            return region
        region = self._append([data])
        self.written_bytes += data.nbytes
        if self.index is not None:
            self.index.add(data, region)
        return region

    def place_chunks(self, chunks: Callable[[], Iterator[memoryview]], length: int) -> Region:
        """:meth:`place` for bytes read in pieces (``chunks()`` yields them in order, and is called twice at most:
        to hash them, then to write them if the index does not hold them), so that a large tensor read from a file
        is never resident all at once."""
        hasher = new_hasher()
        for chunk in chunks():
            hasher.update(chunk)
        hexdigest = hasher.hexdigest()
        region = self.index.find_digest(hexdigest, length) if self.index is not None else None
        if region is not None:
            self.shared_bytes += length
            return region
        region = self._append(chunks())
        self.written_bytes += length
        if self.index is not None:
            self.index.add_digest(hexdigest, region)
        return region

    def _append(self, data: Iterable[memoryview]) -> Region:
        """Write ``data`` (one tensor's bytes, in one or more pieces) at the next aligned offset."""
        if self._handle is None:
            self._handle = open(self.data_path, "wb")  # noqa: SIM115 — closed by close()
        pad = -self._offset % ALIGNMENT
        if pad:
            self._handle.write(b"\0" * pad)
            self._offset += pad
        start = self._offset
        for piece in data:
            self._handle.write(piece)
            self._offset += piece.nbytes
        return Region(self.location, start, self._offset - start)


def point_at(proto: Any, region: Region) -> None:
    """Make ``proto``'s data the external ``region`` (replacing inline data or another region)."""
    from onnx import TensorProto

    proto.ClearField("raw_data")
    del proto.external_data[:]
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", region.file), ("offset", region.offset), ("length", region.length)):
        entry = proto.external_data.add()
        entry.key, entry.value = key, str(value)


def share_external_data(graph_path: Path, index: ContentIndex) -> int:
    """Rewrite a saved graph's external data so that tensors ``index`` already holds point there; the others are
    copied (aligned, one at a time through a memory map) into a fresh ``<graph>.data`` and indexed for the graphs
    after it. Returns the bytes no longer stored twice. A graph without external data is left as it is."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    external = [(t, external_info(t)) for t in model.graph.initializer]
    external = [(t, info) for t, info in external if info is not None]
    if not external:
        return 0
    target = graph_path.with_name(graph_path.name + ".data")
    scratch = target.with_name(target.name + ".tmp")
    sources: dict[str, mmap.mmap] = {}
    writer = WeightWriter(scratch, index, location=target.name)
    try:
        for tensor, info in external:
            if info.file not in sources:
                with open(graph_path.parent / info.file, "rb") as handle:
                    sources[info.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            point_at(tensor, writer.place_chunks(_reader(sources[info.file], info), info.length))
    finally:
        writer.close()
        for mapped in sources.values():
            mapped.close()
    old_files = {info.file for _, info in external}
    if scratch.exists():
        scratch.replace(target)
    elif target.name in old_files:  # every tensor now lies elsewhere: the old file would be dead weight in the bundle
        target.unlink()
    for name in old_files - {target.name}:
        if not index.refers_to(name):
            (graph_path.parent / name).unlink(missing_ok=True)
    onnx.save_model(model, str(graph_path))
    return writer.shared_bytes


#: Bytes of a memory-mapped file read before their pages are released (:func:`_reader`).
_READ_CHUNK = 64 << 20


def _reader(mapped: mmap.mmap, region: Region) -> Callable[[], Iterator[memoryview]]:
    """``region`` of ``mapped`` in chunks, each chunk's pages unmapped from this process once it has been used (they
    stay in the page cache, clean): a graph's data file read through one map would otherwise count in the export's
    resident memory until the map is closed — 2 GB on top of the checkpoint at the 0.8B class (issue 19)."""

    def chunks() -> Iterator[memoryview]:
        for start in range(region.offset, region.offset + region.length, _READ_CHUNK):
            end = min(start + _READ_CHUNK, region.offset + region.length)
            view = memoryview(mapped)[start:end]
            try:
                yield view
            finally:
                view.release()
            if hasattr(mmap, "MADV_DONTNEED"):  # not on Windows
                aligned = start - start % mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)

    return chunks


def save_npy_aligned(path: Path, shape: tuple[int, ...], dtype: np.dtype, chunks: Any) -> tuple[Region, str]:
    """Write a ``.npy`` whose data starts at :data:`ALIGNMENT` (the header padded with spaces, as the format allows),
    from an iterable of C-order chunks — so ONNX graphs can point their external data at the table's bytes, and
    ``np.load(mmap_mode="r")`` reads it as any ``.npy``. Returns the data's region and digest."""
    import struct

    header = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                   "shape": tuple(shape)}).encode("latin1")  # fmt: skip
    magic = b"\x93NUMPY\x01\x00"
    pad = ALIGNMENT - len(magic) - 2 - len(header) - 1
    if pad < 0:
        raise ValueError(f"npy header of {len(header)} bytes does not fit in {ALIGNMENT}")
    hasher, length = new_hasher(), 0
    with open(path, "wb") as handle:
        handle.write(magic + struct.pack("<H", ALIGNMENT - len(magic) - 2) + header + b" " * pad + b"\n")
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk, dtype=dtype)).cast("B")
            hasher.update(data)
            handle.write(data)
            length += data.nbytes
    return Region(path.name, ALIGNMENT, length), hasher.hexdigest()
