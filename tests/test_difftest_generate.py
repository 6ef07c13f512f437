"""The campaign case generator (difftest.generate) and the hypothesis strategies (difftest.strategies)."""

from __future__ import annotations

import random
from collections import Counter
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difftest.backend import SpecBackend
from difftest.builders import build
from difftest.case import Case, Environment
from difftest.generate import (
    NONDETERMINISTIC,
    FastPicker,
    Generator,
    _division,
    edge_value,
    encode_checked,
    generable_rows,
    generate_case,
    generate_for,
    pools,
    rows_covered,
    shift_count,
)
from difftest.layout import ENVIRONMENTS, layout
from difftest.strategies import cases, environments, instructions
from spec.cpu import SpecCPU
from spec.decode.decoder import decode
from spec.decode.encode import mode_valid
from spec.decode.insn import MEM
from spec.faults import Fault

ARCHITECTURAL = {"halted", "exception", "shutdown"}
NOT_ACCESSES = {"LEA", "INVLPG", "NOP", "PREFETCH", "PREFETCHNTA", "PREFETCHT0", "PREFETCHT1", "PREFETCHT2"}
PAGING = [e for e in ENVIRONMENTS if e.paging != "none"]
LONG64 = [e for e in ENVIRONMENTS if e.mode == "long64"]


@cache
def sample(n: int = 150, seed: int = 7) -> tuple[Case, ...]:
    """``n`` generated cases over every environment (shared by several tests)."""
    return tuple(generate_case(seed, i) for i in range(n))


@cache
def outcomes(n: int = 150, seed: int = 7) -> tuple:
    be = SpecBackend()
    return tuple(be.run(c.snapshot, c.budget) for c in sample(n, seed))


# -- determinism and validity ---------------------------------------------------------------------

def test_same_seed_and_index_give_the_same_case() -> None:
    for i in (0, 1, 17):
        assert generate_case(3, i).to_json() == generate_case(3, i).to_json()
        assert generate_case(3, i, envs=LONG64, length=7).to_json() == \
            generate_case(3, i, envs=LONG64, length=7).to_json()
    assert generate_case(3, 0).to_json() != generate_case(3, 1).to_json()
    assert generate_case(3, 0).to_json() != generate_case(4, 0).to_json()


def test_provenance_and_name_record_the_stream() -> None:
    c = generate_case(5, 9, campaign="nightly run")
    assert (c.provenance.seed, c.provenance.index, c.provenance.campaign) == (5, 9, "nightly run")
    assert c.name == "nightly-run-s5-i9"


def test_bad_length_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="length"):
        generate_case(1, 0, length=0)


def test_cases_validate_as_case_files() -> None:
    for c in sample()[:40]:
        again = Case.model_validate_json(c.to_json())
        assert again == c
        assert c.budget >= 2 * len(c.insn_offsets)


def test_every_case_runs_on_the_spec_and_stops_architecturally() -> None:
    kinds = Counter(o.stop.kind for o in outcomes())
    assert set(kinds) <= ARCHITECTURAL, kinds  # no budget stop: control flow only goes forward
    assert kinds["halted"] > 0 and kinds["exception"] > 0


def test_rip_never_leaves_the_code() -> None:
    for c in sample()[:80]:
        lay = layout(c.env)
        end = lay.code + len(c.code_bytes)
        st = c.snapshot.to_state()
        cpu = SpecCPU(st)
        for _ in range(c.budget):
            assert lay.code <= st.rip < end, f"{c.name}: RIP {st.rip:#x} outside the code"
            if cpu.step() is not None:
                break


def test_generated_parts_encode_valid_rows_that_decode_back() -> None:
    """Every instruction (but the deliberately invalid last ones) is what encode.build makes of its parts,
    valid under the strict rules, and decodes as the row it was built from."""
    checked = 0
    for k in range(120):
        env = ENVIRONMENTS[k % len(ENVIRONMENTS)]
        gen = Generator(env, FastPicker(random.Random(k)))
        gen.run(20)
        gen.layout_code()
        for unit in gen.units:
            for it in unit.items:
                if not mode_valid(it.row, env.bits):
                    continue
                assert encode_checked(it.row, env.bits, it.kw) == it.code, it.row.key
                insn = decode(it.code, env.bits, real=env.mode == "real")
                assert insn.row is it.row and insn.length == len(it.code), (it.row.key, it.code.hex())
                checked += 1
    assert checked > 2000


# -- what the instructions do ---------------------------------------------------------------------

def _linear(st, insn, op, mode: str) -> int:  # type: ignore[no-untyped-def]
    ea = op.disp + (st.rip + insn.length if op.rip_rel else 0)
    if op.base is not None:
        ea += st.gpr[op.base]
    if op.index is not None:
        ea += st.gpr[op.index] << op.scale
    ea &= (1 << insn.addrsize) - 1
    base = st.seg[op.seg].base if (mode != "long64" or op.seg in (4, 5)) else 0
    return (base + ea) & ((1 << 64) - 1)


def test_memory_operands_mostly_land_in_the_data_pages() -> None:
    """Measured on the spec, instruction by instruction: the linear address of each executed explicit
    memory operand, from the actual register values and segment bases."""
    inside = total = 0
    for c in sample()[:100]:
        lay = layout(c.env)
        st = c.snapshot.to_state()
        cpu = SpecCPU(st)
        for _ in range(c.budget):
            try:
                insn = decode(st.mem.phys.read_bytes(st.rip, 15), c.env.bits, real=c.env.mode == "real")
            except Fault:
                break  # the invalid last instruction: #UD
            if insn.row.mnemonic not in NOT_ACCESSES:
                for op in insn.operands:
                    if op.kind == MEM and op.size:
                        total += 1
                        inside += lay.data[0] <= _linear(st, insn, op, c.env.mode) < lay.data_end
            if cpu.step() is not None:
                break
    assert total > 300
    assert inside / total >= 0.8, (inside, total)


@pytest.mark.parametrize("variant", ["initial", "guest"])
def test_paging_corruptions_fault(variant: str) -> None:
    envs = [e for e in PAGING if variant == "initial" or e.cpl == 0]
    be = SpecBackend()
    faults = total = 0
    for k in range(48):
        env = envs[k % len(envs)]
        c = generate_for(env, 100 + k, corruption=variant)
        tag = next(t for t in c.tags if t.startswith("corrupt:"))
        assert tag.split(":")[2] == variant
        lay = layout(env)
        if variant == "initial":  # the snapshot's entry differs from the layout's in one field
            changed = [a for a, v in lay.entries.items()
                       if int.from_bytes(_phys(c, a, lay.entry_bytes), "little") != v]
            assert len(changed) == 1
        else:  # the guest writes the entry, then flushes
            text = "\n".join(c.disassembly)
            assert ("invlpg" in text) or ("mov cr3" in text)
        o = be.run(c.snapshot, c.budget)
        total += 1
        faults += o.stop.kind == "exception" and o.stop.vector == 14
    assert faults / total >= 0.6, (faults, total)


def _phys(c: Case, addr: int, n: int) -> bytes:
    page = next(p for p in c.snapshot.pages if p.address == addr & ~0xFFF)
    return page.to_bytes()[addr & 0xFFF:(addr & 0xFFF) + n]


def test_divisions_overflow_and_divide_by_zero_sometimes() -> None:
    pick = FastPicker(random.Random(1))
    for w, signed in ((8, False), (16, True), (32, True), (64, False), (64, True)):
        kinds = Counter()
        for _ in range(400):
            n, d = _division(pick, w, signed)
            if d == 0:
                kinds["zero"] += 1
                continue
            if signed:
                ns, ds = n - (n >> (2 * w - 1) << 2 * w), d - (d >> (w - 1) << w)
                q = abs(ns) // abs(ds) * (1 if (ns < 0) == (ds < 0) else -1)
                ok = -(1 << (w - 1)) <= q < 1 << (w - 1)
            else:
                ok = n // d < 1 << w
            kinds["ok" if ok else "overflow"] += 1
        assert kinds["zero"] > 20 and kinds["overflow"] > 20 and kinds["ok"] > 150, (w, signed, kinds)


def test_edge_values_and_shift_counts_are_weighted_to_the_edges() -> None:
    pick = FastPicker(random.Random(2))
    for bits in (8, 16, 32, 64):
        seen = Counter(edge_value(pick, bits) for _ in range(2000))
        m = (1 << bits) - 1
        for v in (0, 1, m, 1 << (bits - 1), (1 << (bits - 1)) - 1):
            assert seen[v] > 40, (bits, hex(v))
        assert all(0 <= v <= m for v in seen)
    counts = Counter(shift_count(pick, 32) for _ in range(2000))
    for v in (0, 1, 31, 32, 33, 63, 64):
        assert counts[v] > 40, v


def test_generated_divisions_raise_de_on_the_spec_sometimes() -> None:
    vectors = Counter(o.stop.vector for o in outcomes() if o.stop.kind == "exception")
    assert vectors[0] > 0


# -- what is and is not generated -----------------------------------------------------------------

def test_nondeterministic_and_device_rows_are_excluded_by_default() -> None:
    for env in ENVIRONMENTS:
        p = pools(env)
        names = {r.mnemonic for r in (*p.body, *p.last)}
        assert not names & (NONDETERMINISTIC | {"IN", "OUT", "INS", "OUTS"})
    with_nd = pools(LONG64[0], nondeterministic=True)
    assert {"RDTSC", "CPUID"} <= {r.mnemonic for r in with_nd.body}


def test_nondeterministic_cases_are_tagged() -> None:
    tagged = [generate_case(1, i, envs=LONG64, nondeterministic=True) for i in range(60)]
    hit = [c for c in tagged if "nondeterministic" in c.tags]
    assert hit
    assert all(any(w in "\n".join(c.disassembly) for w in ("rdtsc", "rdpmc", "cpuid")) for c in hit)


def test_rows_covered_names_rows_and_mode() -> None:
    env = LONG64[0]
    case = build(env, [bytes.fromhex("90"), bytes.fromhex("01c0"), bytes.fromhex("0f0b")])
    got = rows_covered(case)
    assert ("90 NOP", "long64") in got and ("01 ADD Ev,Gv", "long64") in got and ("F4 HLT", "long64") in got
    assert not any(k.startswith("0F 0B") for k, _ in got)  # UD2 is not a valid form


def test_remembered_rows_are_the_decoded_rows() -> None:
    """rows_covered answers from memory for generated cases: the same as decoding a reloaded copy."""
    for c in sample()[:60]:
        reloaded = Case.model_validate_json(c.to_json())
        assert rows_covered(c) == rows_covered(reloaded)


def test_every_body_row_is_covered_after_a_few_hundred_cases() -> None:
    envs = [e for e in ENVIRONMENTS if e.mode == "prot32"]
    covered: set[str] = set()
    for i in range(220):
        covered |= {k for k, _ in rows_covered(generate_case(11, i, envs=envs))}
    body = {r.key for e in envs for r in pools(e).body}
    assert len(body & covered) / len(body) >= 0.97, sorted(body - covered)[:20]
    assert covered <= generable_rows("prot32", envs)


# -- hypothesis strategies --------------------------------------------------------------------------

@settings(max_examples=8, deadline=None)
@given(cases(envs=[*LONG64[:2], Environment(mode="real")], length=(1, 4)))
def test_strategy_cases_run_on_the_spec(case: Case) -> None:
    o = SpecBackend().run(case.snapshot, case.budget)
    assert o.stop.kind in ARCHITECTURAL
    assert case.provenance.generator == "difftest.strategies"


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_strategy_instructions_decode_as_valid_rows(data: st.DataObject) -> None:
    env = data.draw(environments())
    insns = data.draw(instructions(env))
    assert insns
    for raw in insns:
        insn = decode(raw, env.bits, real=env.mode == "real")
        assert insn.length == len(raw) and mode_valid(insn.row, env.bits)


def test_strategies_shrink_towards_simple_cases() -> None:
    from hypothesis import find

    env = LONG64[0]
    simplest = find(instructions(env), lambda insns: True, settings=settings(max_examples=50, database=None))
    assert len(b"".join(simplest)) <= 8


def test_length_range_must_be_sane() -> None:
    with pytest.raises(ValueError, match="length"):
        cases(length=(0, 3))
