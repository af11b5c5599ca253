"""The byte layout (shmcast._layout): alignment, disjoint lines, validation, the header."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmcast import SegmentError
from shmcast import _layout as L

KINDS = [L.KIND_BROADCAST, L.KIND_GATHER]

geometries = st.builds(
    L.Geometry.checked,
    st.sampled_from(KINDS),
    st.integers(1, L.MAX_PEERS),
    st.integers(2, L.MAX_SLOTS),
    st.integers(1, 1 << 25).map(lambda n: n * L.SLOT_ALIGN),
)


def _intervals_disjoint(intervals: list[tuple[int, int]]) -> bool:
    ordered = sorted(intervals)
    return all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ordered))


def test_fixed_lines_are_line_aligned_and_distinct() -> None:
    fixed = [
        L.BCAST_WRITER_OFF,
        L.SLEEPERS_OFF,
        L.DATA_FUTEX_OFF,
        L.BCAST_SPACE_FUTEX_OFF,
        L.ATTACH_FUTEX_OFF,
    ]
    assert all(off % L.LINE == 0 for off in [*fixed, L.PEERS_OFF])
    assert len(set(fixed)) == len(fixed)
    assert L.HEADER.size <= L.LINE <= min(fixed)  # the header fits in line 0
    assert max(fixed) + L.LINE <= L.PEERS_OFF


def test_line_fields_fit_naturally_aligned_in_one_line() -> None:
    fields = [(L.SEQ, 8), (L.SLEEPING, 4), (L.STATE, 4), (L.PID, 8), (L.START, 8), (L.MSGS, 8)]
    assert _intervals_disjoint([(off, off + size) for off, size in fields])
    for off, size in fields:
        assert off % size == 0
        assert off + size <= 64  # the first 64-byte half: one cache line


def test_header_and_descriptor_formats() -> None:
    assert L.HEADER.size == 96 <= L.LINE
    assert L.DESC_SIZE == 64  # one cache line per descriptor
    # The offsets documented in the module docstring.
    values = (L.MAGIC, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14)
    packed = L.HEADER.pack(*values)
    assert struct.unpack_from("<I", packed, 8)[0] == 1  # version
    assert struct.unpack_from("<I", packed, 12)[0] == 2  # kind
    assert struct.unpack_from("<Q", packed, 48)[0] == 8  # creator pid
    assert struct.unpack_from("<Q", packed, 80)[0] == 12  # data_off
    assert struct.unpack_from("<I", packed, 88)[0] == 13  # options


def test_header_options_round_trip_and_unknown_ones_are_refused() -> None:
    g = L.Geometry.checked(L.KIND_BROADCAST, 2, 8, 64)
    buf = bytearray(g.total_size)
    header = L.Header(L.LAYOUT_VERSION, 5, g, 1, 2, 3, L.OPT_CHECKSUM)
    header.pack_into(memoryview(buf))
    buf[0:8] = L.MAGIC
    again = L.Header.read(memoryview(buf), "x")
    assert again == header and again.checksum
    struct.pack_into("<I", buf, 88, 1 << 9)
    with pytest.raises(SegmentError, match="options"):
        L.Header.read(memoryview(buf), "x")


def test_state_and_flag_bits_are_distinct() -> None:
    states = [L.EXPECTED, L.ATTACHED, L.DETACHED, L.DROPPED]
    assert all(s and s & (s - 1) == 0 for s in states)  # single bits
    assert len(set(states)) == 4
    assert L.GATING == L.EXPECTED | L.ATTACHED
    flags = [L.FLAG_FIRST, L.FLAG_CONT, L.FLAG_PAD, L.FLAG_CONTIG]
    assert len(set(flags)) == 4 and all(f & L.KIND_MASK == 0 for f in flags)
    for kind in (L.MSG_RAW, L.MSG_OBJECT):
        assert (kind << L.KIND_SHIFT) & ~L.KIND_MASK == 0


@settings(max_examples=200, deadline=None)
@given(geometries)
def test_geometry_offsets_are_aligned_and_regions_disjoint(g: L.Geometry) -> None:
    assert g.desc_off % L.LINE == 0
    assert g.data_off % L.PAGE == 0
    assert g.total_size % L.PAGE == 0
    assert g.capacity == g.n_slots * g.slot_size
    assert g.n_rings == (1 if g.kind == L.KIND_BROADCAST else g.n_peers)

    # Every participant line is line-aligned, lies between the fixed lines and the
    # descriptors, and no two lines overlap.
    lines = [(0, L.PEERS_OFF)]  # header and fixed lines
    for r in range(min(g.n_rings, 64)):
        ring = g.ring(r)
        if g.kind == L.KIND_GATHER:
            lines += [
                (ring.writer, ring.writer + L.LINE),
                (ring.space_futex, ring.space_futex + L.LINE),
            ]
        for i in range(ring.n_readers):
            off = ring.reader_line(i)
            lines.append((off, off + L.LINE))
    for start, end in lines[1:]:
        assert start % L.LINE == 0
        assert start >= L.PEERS_OFF and end <= g.desc_off
    assert _intervals_disjoint(lines)

    # Descriptor tables and data regions: one per ring, aligned, disjoint, inside the segment.
    regions = []
    for r in range(min(g.n_rings, 64)):
        ring = g.ring(r)
        assert ring.n_slots == g.n_slots and ring.slot_size == g.slot_size
        assert ring.desc_off % L.DESC_SIZE == 0
        assert ring.data_off % L.PAGE == 0
        assert ring.desc_at(0) == ring.desc_off
        assert ring.data_at(1) - ring.data_at(0) == g.slot_size
        regions.append((ring.desc_off, ring.desc_off + L.DESC_SIZE * g.n_slots))
        regions.append((ring.data_off, ring.data_off + g.capacity))
    assert _intervals_disjoint(regions)
    assert min(start for start, _ in regions) >= g.desc_off
    assert g.ring(g.n_rings - 1).data_off + g.capacity <= g.total_size


def test_broadcast_ring_uses_the_fixed_lines() -> None:
    g = L.Geometry.checked(L.KIND_BROADCAST, 3, 8, 128)
    ring = g.ring()
    assert ring.writer == L.BCAST_WRITER_OFF
    assert ring.space_futex == L.BCAST_SPACE_FUTEX_OFF
    assert ring.sleepers == L.SLEEPERS_OFF and ring.data_futex == L.DATA_FUTEX_OFF
    # the announcement count: the u64 after the sleepers u32, in the same line
    assert ring.announced == L.ANNOUNCED_OFF == L.SLEEPERS_OFF + 8
    assert [g.peer_line(i) for i in range(3)] == [ring.reader_line(i) for i in range(3)]
    assert g.peer_line(1) - g.peer_line(0) == L.LINE


def test_gather_rings_have_their_own_lines() -> None:
    g = L.Geometry.checked(L.KIND_GATHER, 4, 8, 128)
    rings = [g.ring(r) for r in range(4)]
    assert len({r.writer for r in rings}) == 4
    assert len({r.space_futex for r in rings}) == 4
    assert all(r.n_readers == 1 for r in rings)
    assert [g.peer_line(j) for j in range(4)] == [r.writer for r in rings]
    # All rings share the reader's sleep word.
    assert {r.data_futex for r in rings} == {L.DATA_FUTEX_OFF}


@pytest.mark.parametrize(
    ("args", "error", "words"),
    [
        ((L.KIND_BROADCAST, 0, 8, 64), ValueError, "n_readers must be between 1"),
        ((L.KIND_BROADCAST, L.MAX_PEERS + 1, 8, 64), ValueError, "n_readers"),
        ((L.KIND_GATHER, 0, 8, 64), ValueError, "n_writers must be between 1"),
        ((L.KIND_BROADCAST, 1, 1, 64), ValueError, "n_slots must be between 2"),
        ((L.KIND_BROADCAST, 1, L.MAX_SLOTS + 1, 64), ValueError, "n_slots"),
        ((L.KIND_BROADCAST, 1, 8, 0), ValueError, "slot_size must be a multiple of 64"),
        ((L.KIND_BROADCAST, 1, 8, 32), ValueError, "slot_size"),
        ((L.KIND_BROADCAST, 1, 8, 100), ValueError, "slot_size"),
        ((L.KIND_BROADCAST, 1, 8, (1 << 31) + 64), ValueError, "2 GiB"),
        ((L.KIND_BROADCAST, 1.0, 8, 64), TypeError, "n_readers must be an int, not float"),
        ((L.KIND_BROADCAST, True, 8, 64), TypeError, "not bool"),
        ((L.KIND_BROADCAST, 1, "8", 64), TypeError, "n_slots must be an int"),
        ((L.KIND_BROADCAST, 1, 8, None), TypeError, "slot_size must be an int"),
    ],
)
def test_geometry_validation_errors(args: tuple, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        L.Geometry.checked(*args)


def test_geometry_limits_are_accepted() -> None:
    L.Geometry.checked(L.KIND_BROADCAST, 1, 2, 64)
    L.Geometry.checked(L.KIND_BROADCAST, L.MAX_PEERS, L.MAX_SLOTS, 1 << 31)


# -- the header -------------------------------------------------------------------------------


def _header(g: L.Geometry) -> L.Header:
    return L.Header(L.LAYOUT_VERSION, 1234, g, 42, 43, 44)


def _packed(g: L.Geometry) -> bytearray:
    buf = bytearray(max(g.total_size, L.HEADER.size))
    _header(g).pack_into(memoryview(buf))
    buf[:8] = L.MAGIC
    return buf


@pytest.mark.parametrize("kind", KINDS)
def test_header_round_trip(kind: int) -> None:
    g = L.Geometry.checked(kind, 3, 16, 512)
    assert L.Header.read(memoryview(_packed(g)), "x") == _header(g)


def test_header_without_magic_is_rejected() -> None:
    g = L.Geometry.checked(L.KIND_BROADCAST, 1, 4, 64)
    buf = bytearray(g.total_size)
    _header(g).pack_into(memoryview(buf))  # the magic is written last, by the creator
    with pytest.raises(SegmentError, match="not a shmcast queue"):
        L.Header.read(memoryview(buf), "half")


def _patched(fmt: str, offset: int, value: int) -> bytearray:
    buf = _packed(L.Geometry.checked(L.KIND_BROADCAST, 2, 8, 256))
    struct.pack_into(fmt, buf, offset, value)
    return buf


@pytest.mark.parametrize(
    ("fmt", "offset", "value", "words"),
    [
        ("<I", 8, L.LAYOUT_VERSION + 1, "layout version"),
        ("<I", 12, 9, "unknown kind 9"),
        ("<I", 32, 0, "corrupted header: n_readers"),
        ("<I", 36, 1, "corrupted header: n_slots"),
        ("<Q", 40, 100, "corrupted header: slot_size"),
        ("<Q", 72, 4096 * 3, "inconsistent offsets"),
        ("<Q", 80, 0, "inconsistent offsets"),
        ("<Q", 24, 1 << 40, "inconsistent offsets"),
        ("<I", 36, 4096, "inconsistent offsets"),  # valid alone, but not the sizes written
    ],
)
def test_corrupted_headers_are_rejected(fmt: str, offset: int, value: int, words: str) -> None:
    with pytest.raises(SegmentError, match=words):
        L.Header.read(memoryview(_patched(fmt, offset, value)), "seg")


def test_truncated_and_tiny_segments_are_rejected() -> None:
    g = L.Geometry.checked(L.KIND_BROADCAST, 2, 8, 256)
    buf = _packed(g)
    with pytest.raises(SegmentError, match="truncated"):
        L.Header.read(memoryview(buf)[: g.total_size - 1], "short")
    with pytest.raises(SegmentError, match="too small"):
        L.Header.read(memoryview(buf)[: L.HEADER.size - 1], "tiny")


def test_errors_name_the_segment() -> None:
    with pytest.raises(SegmentError, match="'my-segment'"):
        L.Header.read(memoryview(bytearray(4096)), "my-segment")
