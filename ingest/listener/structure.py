"""The binary data-set walker: proves received bytes are one complete, well-formed data set.

pydicom reads truncated or over-long values silently; this walk checks that
every element's length fits exactly before we answer success for the bytes.
Its error messages name byte offsets only, never a tag read from the data:
when a length is wrong, the "tag" at the next position is whatever bytes
follow, which may be patient data.
"""

from __future__ import annotations

import struct
import zlib
from io import RawIOBase
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from preread.ingest.assembly.catalog import IDENTITY_KEYWORDS, InstanceIdentity, uid_value

#: Largest inflated size of a deflated data set (a deflate bomb is refused, not inflated).
MAX_INFLATED = 1 << 30
#: Deepest sequence nesting accepted.
MAX_DEPTH = 32


class Malformed(ValueError):
    """The encoded dataset is not a well-formed DICOM data set."""


#: Top-level attributes the index needs; the fast header read keeps only these.
HEADER_TAGS = frozenset(
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyDate", "AccessionNumber", "Modality",
        "StudyDescription", "SeriesDescription", "PatientID", "PatientSex", "PatientAge", "BodyPartExamined",
        "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "NumberOfFrames",
    )
)
#: :data:`HEADER_TAGS` as plain ints: a set lookup without ``BaseTag.__eq__`` in Python.
_HEADER_INTS = frozenset(int(tag) for tag in HEADER_TAGS)
_IDENTITY_TAGS = tuple(Tag(keyword) for keyword in IDENTITY_KEYWORDS)

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_HEAD = {e: struct.Struct(e + "HHL") for e in "<>"}
_EXPLICIT_HEAD = {e: struct.Struct(e + "HH2sH") for e in "<>"}
_U32 = {e: struct.Struct(e + "L") for e in "<>"}
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD


def check_structure(stream: bytes | memoryview, transfer_syntax: str) -> dict[int, RawDataElement]:
    """Walk every element of the encoded dataset and check each length fits exactly.

    Deflated streams are inflated first (bounded by :data:`MAX_INFLATED`).
    Returns the raw top-level elements named in :data:`HEADER_TAGS` (little
    endian syntaxes only), so that the header need not be parsed again.
    """
    data = memoryview(stream)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            inflated = inflater.decompress(data, MAX_INFLATED)
        except zlib.error:
            raise Malformed("deflate stream is corrupt") from None
        if inflater.unconsumed_tail:
            raise Malformed("deflated data set inflates beyond the limit")
        data = memoryview(inflated)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    endian = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    found: dict[int, RawDataElement] = {}
    end = _walk(data, 0, len(data), implicit, endian, delimiter=None, found=found)
    if end != len(data):
        raise Malformed(f"trailing bytes after the data set at offset {end}")
    return found


class _ChunkReader(RawIOBase):
    """A read-only, seekable file over byte chunks, without joining them (no copy of the data set)."""

    def __init__(self, chunks: tuple[bytes | memoryview, ...]) -> None:
        self._chunks = [memoryview(c).cast("B") for c in chunks]
        self._starts = []
        total = 0
        for chunk in self._chunks:
            self._starts.append(total)
            total += len(chunk)
        self._size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all that is left for ``-1``), across chunk boundaries."""
        left = self._size - self._pos
        count = left if size is None or size < 0 else min(size, left)
        out = bytearray(count)
        filled = 0
        while filled < count:
            filled += self.readinto(memoryview(out)[filled:])
        return bytes(out)

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        for start, chunk in zip(self._starts, self._chunks):
            offset = self._pos - start
            if 0 <= offset < len(chunk):
                count = min(len(target), len(chunk) - offset)
                target[:count] = chunk[offset : offset + count]
                self._pos += count
                return count
        return 0


def read_header(chunks: tuple[bytes | memoryview, ...]) -> Dataset:
    """The header (up to Pixel Data) of a Part 10 file given as chunks, read by ``dcmread`` without a copy."""
    return dcmread(_ChunkReader(chunks), stop_before_pixels=True)


def header_dataset(chunks: bytes | tuple[bytes | memoryview, ...], found: dict[int, RawDataElement],
                   transfer_syntax: str) -> Dataset:
    """The header attributes as a pydicom Dataset, values decoded lazily as dcmread would.

    Built from the elements :func:`check_structure` found; big endian and
    deflated data sets are read with ``dcmread`` from ``chunks`` (the Part 10
    file as chunks) instead.
    """
    if transfer_syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        return read_header((chunks,) if isinstance(chunks, bytes) else chunks)
    return Dataset(cast(Any, found))  # int keys: pydicom makes them tags


def raw_identity(found: dict[int, RawDataElement]) -> InstanceIdentity | None:
    """The identity read straight from the raw UI values, or ``None`` to ask :func:`identity_of`.

    Saves pydicom's element conversion on the hot path; the values are
    validated by the same :func:`~preread.ingest.assembly.catalog.uid_value`
    as ``identity_of`` uses, so both agree on every input.
    """
    values = []
    for tag in _IDENTITY_TAGS:
        element = found.get(tag)
        if element is None or not isinstance(element.value, bytes):
            return None
        value = uid_value(element.value)
        if value is None:
            return None
        values.append(value)
    return InstanceIdentity(*values)


def _walk(data: memoryview, pos: int, end: int, implicit: bool, endian: str, delimiter: int | None, depth: int = 0,
          found: dict[int, RawDataElement] | None = None) -> int:
    """Skip elements from ``pos`` to ``end`` (or to ``delimiter``); returns the position after.

    Elements whose tag is in :data:`HEADER_TAGS` are collected into ``found``.
    """
    if depth > MAX_DEPTH:
        raise Malformed(f"sequences nested too deeply at offset {pos}")
    # one unpack per element header: (group, element, length) or (group, element, VR, short length)
    head = _IMPLICIT_HEAD[endian] if implicit else _EXPLICIT_HEAD[endian]
    u32 = _U32[endian]
    while pos < end:
        start = pos
        if end - pos < 8:
            raise Malformed(f"truncated element header at offset {start}")
        if implicit:
            group, elem, length = head.unpack_from(data, pos)
            vr = b""
        else:
            group, elem, vr, length = head.unpack_from(data, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE:
            if tag == delimiter:
                return pos + 8
            raise Malformed(f"unexpected delimiter at offset {start}")
        if implicit:
            pos += 8
        else:
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise Malformed(f"invalid VR at offset {start}")
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise Malformed(f"truncated element header at offset {start}")
                (length,) = u32.unpack_from(data, pos + 8)
                pos += 12
            else:
                pos += 8
        if length == _UNDEFINED:
            pos = _walk_items(data, pos, end, implicit, endian, depth)
        else:
            if pos + length > end:
                raise Malformed(f"value of the element at offset {start} runs past the end")
            if found is not None and tag in _HEADER_INTS and endian == "<":
                found[tag] = RawDataElement(
                    BaseTag(tag), vr.decode() if vr else None, length, bytes(data[pos : pos + length]), pos,
                    implicit, True,
                )
            pos += length
    if delimiter is not None:
        raise Malformed(f"missing delimiter before offset {pos}")
    return pos


def _walk_items(data: memoryview, pos: int, end: int, implicit: bool, endian: str, depth: int) -> int:
    """Skip the items of an undefined-length sequence or encapsulated pixel data."""
    u16 = struct.Struct(endian + "HH")
    u32 = struct.Struct(endian + "L")
    while True:
        start = pos
        if end - pos < 8:
            raise Malformed(f"undefined-length value not terminated at offset {start}")
        group, elem = u16.unpack_from(data, pos)
        tag = (group << 16) | elem
        (length,) = u32.unpack_from(data, pos + 4)
        pos += 8
        if tag == _SEQ_DELIM:
            return pos
        if tag != _ITEM:
            raise Malformed(f"expected an item at offset {start}")
        if length == _UNDEFINED:
            pos = _walk(data, pos, end, implicit, endian, _ITEM_DELIM, depth + 1)
        elif pos + length > end:
            raise Malformed(f"item at offset {start} runs past the end")
        else:
            pos += length
