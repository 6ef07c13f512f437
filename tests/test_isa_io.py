"""Port I/O: IN, OUT, INS, OUTS, the I/O protection check, and the I/O bus.

References: SDM Vol. 1 19.5 (I/O privilege level, I/O permission bitmap),
Vol. 2A IN / INS, Vol. 2B OUT / OUTS and REP; Vol. 3A 20.2.8.1 (virtual-8086
mode I/O); APM Vol. 2 13.3.  Every encoding used here is checked with iced-x86
(``test_encodings``).

The hypothesis properties compare the permission decision and the bus traffic
with plain-int models written here; the examples pin the named edge cases
(bitmap byte boundaries, the two-byte bitmap read at the TSS limit, IOPL
bypass, virtual-8086 mode, 16-bit and missing TSS, INS fault order).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, Formatter, FormatterSyntax

from spec import flags as F
from spec.cpu import SpecCPU, StopEvent
from spec.faults import Vector
from spec.io import EMPTY_IO_BUS, EmptyIOBus, IOBus, RecordingIOBus
from spec.machine import BITS, CODE, DATA, MODES, USER_CS, USER_DS, flat_machine
from spec.memory import PAGE
from spec.state import MachineState, Segment
from tests.conftest import GPR, reg

M32, M64 = 0xFFFF_FFFF, (1 << 64) - 1
TSS = 0x2000  # mapped in every flat machine; the bitmap may run to TSS + 0x68 + 0x2000
IOMAP = 0x68
PROT_MODES = ("prot16", "prot32", "long64")
SIZE_BYTES = {8: 1, 16: 2, 32: 4}


# -- machines ---------------------------------------------------------------------------------
def _segment(code: bool, mode: str, dpl: int) -> Segment:
    bits = BITS[mode]
    sel = ((USER_CS if code else USER_DS) & ~3) if dpl else (0x08 if code else 0x10)
    return Segment(selector=sel | dpl, base=0, limit=M32, type=0xB if code else 0x3, s=1, dpl=dpl, p=1,
                   l=int(code and bits == 64), db=int(bits == 32 or (bits == 64 and not code)), g=1)


def machine(mode: str, code: str, *, cpl: int = 0, iopl: int = 0, vm: bool = False,
            bitmap: bytes | None = None, tss_limit: int | None = None, tss_type: int = 0xB,
            iomap: int = IOMAP, bus: IOBus | None = None, **regs: int) -> MachineState:
    """A flat machine running ``code`` (hex, HLT appended) at ``cpl`` with IOPL ``iopl``.

    With ``bitmap`` (protected modes) TR holds a TSS at :data:`TSS` whose I/O
    map (at ``iomap``) is ``bitmap`` and whose limit is ``tss_limit`` (default:
    the last bitmap byte).  Without one, TR is marked unusable (no TSS).
    """
    s = flat_machine(mode, bytes.fromhex(code.replace(" ", "")) + b"\xf4")  # type: ignore[arg-type]
    if mode != "real":
        if cpl:
            s.seg = [_segment(k == 1, mode, cpl) for k in range(6)]
        if vm:
            s.seg = [Segment(selector=0, base=0, limit=0xFFFF, type=0xB if k == 1 else 0x3, dpl=3) for k in range(6)]
            s.rflags_sys |= 1 << F.VM
    s.rflags_sys |= iopl << F.IOPL_SHIFT
    if bitmap is not None:
        s.mem.phys.write(TSS + 0x66, 2, iomap)
        s.mem.phys.write_bytes(TSS + iomap, bitmap)
        limit = tss_limit if tss_limit is not None else iomap + len(bitmap) - 1
        s.tr = Segment(selector=0x28, base=TSS, limit=limit, type=tss_type, s=0, dpl=0, p=1)
    else:
        s.tr = Segment(selector=0, base=0, limit=0, type=0xB, s=0, p=0, unusable=True)
    s.io = bus if bus is not None else RecordingIOBus()
    for name, v in regs.items():
        s.gpr[GPR[name]] = v & M64
    return s


def run(s: MachineState, *, vendor: str = "amd", limit: int = 1000) -> StopEvent | None:
    """Step until RIP reaches the appended HLT (not executed) or an event; return the event."""
    cpu = SpecCPU(s, vendor=vendor)
    end = CODE + len(_code_bytes(s))
    for _ in range(limit):
        if s.rip == end:
            return None
        ev = cpu.step()
        if ev is not None:
            return ev
    raise AssertionError("did not reach the end of the code")


def _code_bytes(s: MachineState) -> bytes:
    """The test code (everything before the HLT this module appends)."""
    data = s.mem.phys.read_bytes(CODE, 64)
    return data[: data.rindex(b"\xf4")]


def gp0(ev: StopEvent | None) -> bool:
    return ev is not None and ev.kind == "fault" and ev.vector == Vector.GP and ev.error_code == 0


def log(s: MachineState) -> list[tuple[str, int, int, int]]:
    return s.io.log  # type: ignore[attr-defined]


# -- encodings ------------------------------------------------------------------------------
def in_code(mode: str, w: int, port: int | None) -> str:
    """IN AL/AX/EAX from imm8 (``port``) or DX (``None``)."""
    p66 = "66" if (w == 16) != (BITS[mode] == 16) and w != 8 else ""
    return p66 + (("e4" if w == 8 else "e5") + f"{port:02x}" if port is not None else ("ec" if w == 8 else "ed"))


def out_code(mode: str, w: int, port: int | None) -> str:
    p66 = "66" if (w == 16) != (BITS[mode] == 16) and w != 8 else ""
    return p66 + (("e6" if w == 8 else "e7") + f"{port:02x}" if port is not None else ("ee" if w == 8 else "ef"))


def str_code(mode: str, op: str, w: int, *, rep: bool = False, a67: bool = False, seg: str = "") -> str:
    """[seg] [F3] [67] [66] INS (6C/6D) or OUTS (6E/6F)."""
    p66 = "66" if (w == 16) != (BITS[mode] == 16) and w != 8 else ""
    base = 0x6C if op == "ins" else 0x6E
    return seg + ("f3" if rep else "") + ("67" if a67 else "") + p66 + f"{base + (w != 8):02x}"


def test_encodings() -> None:
    """The encoders above produce the intended instructions (iced-x86)."""
    fmt = Formatter(FormatterSyntax.INTEL)

    def text(mode: str, code: str) -> str:
        return fmt.format(Decoder(BITS[mode], bytes.fromhex(code)).decode())

    reg_name = {8: "al", 16: "ax", 32: "eax"}
    for mode in MODES:
        for w in (8, 16, 32):
            r = reg_name[w]
            assert text(mode, in_code(mode, w, 0x60)) == f"in {r},60h"
            assert text(mode, in_code(mode, w, None)) == f"in {r},dx"
            assert text(mode, out_code(mode, w, 0x80)) == f"out 80h,{r}"
            assert text(mode, out_code(mode, w, None)) == f"out dx,{r}"
            sfx = {8: "b", 16: "w", 32: "d"}[w]
            assert text(mode, str_code(mode, "ins", w, rep=True)).startswith(f"rep ins{sfx} ")
            assert text(mode, str_code(mode, "outs", w, rep=True, seg="64")) .startswith(f"rep outs{sfx} dx,fs:")
    assert text("long64", "48e560") == "in eax,60h"  # REX.W: still a 32-bit port access


# -- the bus ----------------------------------------------------------------------------------
def test_default_bus_is_empty() -> None:
    s = flat_machine("real")
    assert s.io is EMPTY_IO_BUS and isinstance(s.io, IOBus)
    assert s.copy().io is s.io  # a copy shares the (host-side) bus
    b = EmptyIOBus()
    assert (b.read(0x60, 1), b.read(0x60, 2), b.read(0xCF8, 4)) == (0xFF, 0xFFFF, M32)
    assert b.write(0x80, 1, 0x12) is None


def test_recording_bus() -> None:
    b = RecordingIOBus({0x71: 0x1234}, inputs={0x3F8: [1, 2]})
    assert b.read(0x3F8, 1) == 1 and b.read(0x3F8, 1) == 2 and b.read(0x3F8, 1) == 0xFF  # FIFO, then default
    assert b.read(0x71, 1) == 0x34 and b.read(0x71, 2) == 0x1234
    b.write(0x70, 1, 0x1FF)
    assert b.ports[0x70] == 0xFF
    assert b.log[-1] == ("out", 0x70, 1, 0xFF) and len(b.log) == 6


def test_snapshot_excludes_bus() -> None:
    from spec.snapshot import Snapshot

    s = machine("prot32", "90", bus=RecordingIOBus({1: 2}))
    snap = Snapshot.from_state(s)
    assert "io" not in snap.model_dump()
    assert snap.to_state().io is EMPTY_IO_BUS


# -- IN / OUT at CPL 0: every mode, size and port form ------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w", [8, 16, 32])
def test_in_from_empty_bus_reads_all_ones(mode: str, w: int) -> None:
    """An unclaimed port floats high; IN AL/AX keep the rest of RAX, IN EAX zero-extends (SDM Vol. 1 3.4.1.1)."""
    s = machine(mode, in_code(mode, w, 0x60) + in_code(mode, w, None), bus=EMPTY_IO_BUS, rax=0x1122334455667788,
                rdx=0x1234)
    assert run(s) is None
    got = reg(s, "rax")
    if w == 32:
        assert got == M32
    else:
        assert got == (0x1122334455667788 & ~((1 << w) - 1)) | ((1 << w) - 1)


@settings(max_examples=60)
@given(mode=st.sampled_from(MODES), w=st.sampled_from([8, 16, 32]), imm=st.booleans(),
       port=st.integers(0, 0xFFFF), value=st.integers(0, M32), rax=st.integers(0, M64))
def test_in_out_bus_traffic(mode: str, w: int, imm: bool, port: int, value: int, rax: int) -> None:
    """IN then OUT: the bus sees exactly one read and one write of the operand size at the port."""
    p = port & 0xFF if imm else port
    bus = RecordingIOBus({p: value})
    s = machine(mode, in_code(mode, w, p if imm else None) + out_code(mode, w, p if imm else None), bus=bus,
                rax=rax, rdx=port | 0xABCD0000)
    assert run(s) is None
    n = SIZE_BYTES[w]
    v = value & ((1 << w) - 1)
    assert bus.log == [("in", p, n, v), ("out", p, n, v)]
    expect = v if w == 32 else (rax & ~((1 << w) - 1)) | v
    assert reg(s, "rax") == expect


def test_in_rexw_is_32_bit() -> None:
    """REX.W does not widen a port access: ``48 E5`` is IN EAX,imm8 (SDM Vol. 2A IN: no 64-bit form)."""
    bus = RecordingIOBus({0x60: 0xDEADBEEF})
    s = machine("long64", "48e560", bus=bus, rax=M64)
    assert run(s) is None
    assert bus.log == [("in", 0x60, 4, 0xDEADBEEF)] and reg(s, "rax") == 0xDEADBEEF


# -- I/O protection -------------------------------------------------------------------------
def ref_allowed(bitmap: bytes, port: int, size: int) -> bool:
    """SDM Vol. 1 19.5.2, as a plain model: two bitmap bytes are read from the port's byte; both must be
    inside the map (the TSS limit ends it), and every port's bit must be clear."""
    first = port // 8
    if first + 1 >= len(bitmap):
        return False
    return all(not (bitmap[(port + k) // 8] >> ((port + k) % 8)) & 1 for k in range(size))


@settings(max_examples=120)
@given(mode=st.sampled_from(PROT_MODES), w=st.sampled_from([8, 16, 32]), out=st.booleans(),
       bitmap=st.binary(min_size=1, max_size=5), port=st.integers(0, 47), cpl=st.sampled_from([1, 2, 3]),
       data=st.data())
def test_bitmap_decides_when_cpl_above_iopl(mode: str, w: int, out: bool, bitmap: bytes, port: int, cpl: int,
                                            data: st.DataObject) -> None:
    """CPL > IOPL: allowed exactly when the bitmap model allows; a denied access is #GP(0) and reaches no device."""
    iopl = data.draw(st.integers(0, cpl - 1))
    bus = RecordingIOBus()
    code = out_code(mode, w, None) if out else in_code(mode, w, None)
    s = machine(mode, code, cpl=cpl, iopl=iopl, bitmap=bitmap, bus=bus, rdx=port, rax=0x55AA55AA)
    ev = run(s)
    n = SIZE_BYTES[w]
    if ref_allowed(bitmap, port, n):
        assert ev is None
        assert bus.log == [("out" if out else "in", port, n, (0x55AA55AA if out else M32) & ((1 << w) - 1))]
    else:
        assert gp0(ev) and ev.rip == CODE  # type: ignore[union-attr]
        assert bus.log == [] and reg(s, "rax") == 0x55AA55AA


@pytest.mark.parametrize(("port", "size", "ok"), [
    (14, 1, True), (15, 1, False), (14, 2, False), (16, 1, False), (17, 2, True),
    (8, 4, True), (12, 4, False), (6, 4, True), (5, 4, True), (4, 4, False),
])
def test_bitmap_byte_boundaries(port: int, size: int, ok: bool) -> None:
    """Accesses straddling bitmap bytes test the bits of every port they cover (SDM Vol. 1 19.5.2).

    Bitmap bytes: 10H (port 4), 80H (port 15), 01H (port 16), 00H, FFH (terminator).
    """
    bitmap = bytes([0x10, 0x80, 0x01, 0x00, 0xFF])
    assert ref_allowed(bitmap, port, size) == ok
    w = {1: 8, 2: 16, 4: 32}[size]
    s = machine("prot32", in_code("prot32", w, None), cpl=3, bitmap=bitmap, rdx=port)
    ev = run(s)
    assert (ev is None) == ok and (ok or gp0(ev))


def test_bitmap_second_byte_beyond_limit() -> None:
    """The processor reads two bitmap bytes: if the second is past the TSS limit the access faults, even
    when the port's own bit is clear; an all-ones byte after the map fixes it (SDM Vol. 1 19.5.2)."""
    s = machine("prot32", "ec", cpl=3, bitmap=b"\x00\x00", rdx=0)
    assert run(s) is None  # bytes 0 and 1 inside the limit
    s = machine("prot32", "ec", cpl=3, bitmap=b"\x00\x00", rdx=8)
    assert gp0(run(s))  # port 8's byte is the last one inside the limit
    s = machine("prot32", "ec", cpl=3, bitmap=b"\x00\x00\xff", rdx=8)
    assert run(s) is None
    s = machine("prot32", "ec", cpl=3, bitmap=b"\x00\x00\xff", rdx=16)
    assert gp0(run(s))  # port 16 is not covered by the map: treated as a set bit


def test_bitmap_base_beyond_limit_denies_everything() -> None:
    """A map base at or past the TSS limit: there is no bitmap, every access at CPL > IOPL faults."""
    s = machine("long64", "ec", cpl=3, bitmap=b"\x00\x00", iomap=0xDFFF, tss_limit=0x67, rdx=0)
    assert gp0(run(s))


@pytest.mark.parametrize("mode", PROT_MODES)
def test_iopl_bypasses_bitmap(mode: str) -> None:
    """CPL <= IOPL: every port is allowed without consulting the TSS (SDM Vol. 1 19.5.1) -- even with none."""
    for cpl, iopl in ((3, 3), (0, 0), (1, 2), (2, 2)):
        bus = RecordingIOBus()
        s = machine(mode, "ec" + out_code(mode, 8, 0x80), cpl=cpl, iopl=iopl, bus=bus, rdx=0x3F8)
        assert run(s) is None, (cpl, iopl)
        assert [e[:2] for e in bus.log] == [("in", 0x3F8), ("out", 0x80)]


@pytest.mark.parametrize("mode", PROT_MODES)
def test_no_tss_or_16_bit_tss_faults(mode: str) -> None:
    """CPL > IOPL with no valid TSS, or a 16-bit TSS (no bitmap), is #GP(0) (SDM Vol. 1 19.5.2)."""
    assert gp0(run(machine(mode, "ec", cpl=3, rdx=0)))
    s = machine(mode, "ec", cpl=3, bitmap=b"\x00\x00\x00", tss_type=0x3, rdx=0)  # busy 16-bit TSS
    assert gp0(run(s))
    s = machine(mode, "ec", cpl=3, bitmap=b"\x00\x00\x00", tss_type=0x9, rdx=0)  # available 32-bit TSS
    assert run(s) is None


def test_real_mode_has_no_checks() -> None:
    """Real-address mode: I/O is always allowed (SDM Vol. 2A IN "Real-Address Mode Exceptions: None")."""
    bus = RecordingIOBus({0x64: 0x1C})
    s = machine("real", "e464 e680 66ed", bus=bus, rdx=0xCFC)  # TR unusable: nothing to consult
    assert run(s) is None
    assert bus.log == [("in", 0x64, 1, 0x1C), ("out", 0x80, 1, 0x1C), ("in", 0xCFC, 4, M32)]


@pytest.mark.parametrize("iopl", [0, 3])
def test_virtual_8086_always_uses_bitmap(iopl: int) -> None:
    """Virtual-8086 mode consults the bitmap whatever IOPL is (SDM Vol. 3A 20.2.8.1; Vol. 1 19.5.2)."""
    s = machine("prot32", "ec", vm=True, iopl=iopl, bitmap=b"\x01\x00\xff", rdx=0)
    assert gp0(run(s))
    s = machine("prot32", "ec", vm=True, iopl=iopl, bitmap=b"\x01\x00\xff", rdx=1)
    assert run(s) is None


def test_tss_reads_are_implicit_supervisor_accesses() -> None:
    """The bitmap read at CPL 3 works on a supervisor-only page (SDM Vol. 3A 4.6.1: implicit accesses)."""
    tss = 0x200000  # the second 2-MiB page of the identity map
    s = machine("long64", "ec", cpl=3, rdx=0)
    pd = s.cr3 + 2 * PAGE
    s.mem.phys.write(pd + 8, 8, tss | 0x83)  # present, writable, supervisor, 2 MiB
    s.mem.phys.map_page(tss)
    s.mem.phys.write(tss + 0x66, 2, IOMAP)
    s.mem.phys.write_bytes(tss + IOMAP, b"\x00\x00\xff")
    s.tr = Segment(selector=0x28, base=tss, limit=IOMAP + 2, type=0xB, s=0, p=1)
    assert run(s) is None


# -- INS / OUTS -------------------------------------------------------------------------------
def _addr_size(mode: str, a67: bool) -> int:
    bits = BITS[mode]
    if bits == 64:
        return 32 if a67 else 64
    return (32 if bits == 16 else 16) if a67 else bits


@settings(max_examples=80)
@given(mode=st.sampled_from(MODES), op=st.sampled_from(["ins", "outs"]), w=st.sampled_from([8, 16, 32]),
       count=st.integers(0, 5), df=st.booleans(), a67=st.booleans(), port=st.integers(0, 0xFFFF),
       values=st.lists(st.integers(0, M32), min_size=5, max_size=5))
def test_rep_string_io(mode: str, op: str, w: int, count: int, df: bool, a67: bool, port: int,
                       values: list[int]) -> None:
    """REP INS/OUTS: the bus sees exactly ``count`` accesses in order; memory, rDI/rSI, rCX as the model says."""
    n = SIZE_BYTES[w]
    aw = _addr_size(mode, a67)
    mask = (1 << w) - 1
    vals = [v & mask for v in values[:count]]
    start = 0x4000 + (0x40 if df else 0)  # offsets < 64 KiB: valid in every mode and address size
    bus = RecordingIOBus(inputs={port: list(vals)})
    hi = 0 if aw == 64 else 0x5A5A5A5A_00000000  # upper bits the address size does not use (must survive)
    code = ("fd" if df else "") + str_code(mode, op, w, rep=True, a67=a67)
    s = machine(mode, code, bus=bus, rcx=hi | count, rdx=port, rsi=hi | start, rdi=hi | start)
    if op == "outs":
        for k, v in enumerate(vals):
            s.mem.phys.write(start + (-k if df else k) * n, n, v)
    assert run(s) is None
    kind = "in" if op == "ins" else "out"
    assert bus.log == [(kind, port, n, v) for v in vals]
    if op == "ins":
        for k, v in enumerate(vals):
            assert s.mem.phys.read(start + (-k if df else k) * n, n) == v
    # the index register moves by count * n in the address size; 16-bit updates keep the upper bits
    idx = "rdi" if op == "ins" else "rsi"
    moved = (start + (-1 if df else 1) * count * n) & ((1 << aw) - 1)
    expect, cnt_expect = (moved, 0) if aw == 32 else (hi | moved, hi)  # 32-bit writes zero-extend
    if count == 0:  # count 0: nothing changes at all
        expect, cnt_expect = hi | start, hi
    assert reg(s, idx) == expect & M64
    assert reg(s, "rcx") == cnt_expect


def test_rep_ins_iterates_one_element_per_step() -> None:
    """Each CPU step moves one element and leaves RIP on the instruction while count remains (SDM Vol. 2B REP)."""
    bus = RecordingIOBus(inputs={0x1F0: [0x1111, 0x2222, 0x3333]})
    s = machine("prot32", "f3 66 6d", bus=bus, rcx=3, rdx=0x1F0, rdi=DATA)
    cpu = SpecCPU(s)
    assert cpu.step() is None
    assert (s.rip, reg(s, "rcx"), reg(s, "rdi")) == (CODE, 2, DATA + 2)
    assert cpu.step() is None and cpu.step() is None
    assert (s.rip, reg(s, "rcx"), reg(s, "rdi")) == (CODE + 3, 0, DATA + 6)
    assert s.mem.phys.read_bytes(DATA, 6) == bytes.fromhex("111122223333")


def test_outs_segment_override() -> None:
    """OUTS reads seg:[rSI] with the override (FS here, base 0x10000); INS always writes ES:[rDI]."""
    bus = RecordingIOBus()
    s = machine("prot32", str_code("prot32", "outs", 8, seg="64"), bus=bus, rsi=0x20, rdx=0x80)
    s.seg[4] = Segment(selector=0x10, base=DATA, limit=M32, type=3, s=1, dpl=0, p=1, db=1, g=1)
    s.mem.phys.write(DATA + 0x20, 1, 0xA7)
    assert run(s) is None
    assert bus.log == [("out", 0x80, 1, 0xA7)] and reg(s, "rsi") == 0x21


def test_ins_checks_destination_before_reading_port() -> None:
    """A faulting INS consumes no device data: the destination is checked (segment, then paging) before the
    port read (module docstring of spec.isa.io; Bochs and QEMU do the same)."""
    # 64-bit: RDI beyond the identity-mapped 1 GiB -> #PF, no port read.
    bus = RecordingIOBus(inputs={0x3F8: [0x41]})
    s = machine("long64", "f3 6c", bus=bus, rcx=2, rdx=0x3F8, rdi=0x4000_0000)
    ev = run(s)
    assert ev is not None and ev.vector == Vector.PF and ev.cr2 == 0x4000_0000
    assert bus.log == [] and reg(s, "rcx") == 2 and reg(s, "rdi") == 0x4000_0000
    # A page-crossing dword whose second page is unmapped: #PF on that page, no port read.
    s = machine("long64", "6d", bus=bus, rdx=0x3F8, rdi=0x4000_0000 - 2)
    ev = run(s)
    assert ev is not None and ev.vector == Vector.PF and ev.cr2 == 0x4000_0000 and bus.log == []
    # 32-bit: ES limit violation -> #GP(0), no port read.
    s = machine("prot32", "6c", bus=bus, rdx=0x3F8, rdi=0x2000)
    s.seg[0] = Segment(selector=0x10, base=0, limit=0xFFF, type=3, s=1, dpl=0, p=1, db=1)
    assert gp0(run(s)) and bus.log == []
    assert bus.inputs[0x3F8] == [0x41]  # the byte is still in the FIFO


def test_string_io_permission_checked_even_with_zero_count() -> None:
    """REP INS/OUTS check I/O permission before the count (as Bochs and QEMU: module docstring)."""
    s = machine("prot32", "f3 6c", cpl=3, bitmap=b"\xff\xff\xff", rcx=0, rdx=0)
    assert gp0(run(s))
    s = machine("prot32", "f3 6c", cpl=3, bitmap=b"\x00\x00\xff", rcx=0, rdx=0)
    assert run(s) is None and log(s) == []


def test_string_io_denied_midway_in_virtual_8086() -> None:
    """Each REP iteration re-checks: a bitmap change between iterations is honoured (per-step execution)."""
    bus = RecordingIOBus(inputs={0: [7, 8]})
    s = machine("prot32", "f3 6c", vm=True, bitmap=b"\x00\x00\xff", bus=bus, rcx=2, rdx=0, rdi=0x3000)
    cpu = SpecCPU(s)
    assert cpu.step() is None and reg(s, "rcx") == 1
    s.mem.phys.write(TSS + IOMAP, 1, 1)  # deny port 0 now
    assert gp0(cpu.step())
    assert bus.log == [("in", 0, 1, 7)] and reg(s, "rcx") == 1 and s.mem.phys.read(0x3000, 1) == 7
