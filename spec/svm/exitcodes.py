"""SVM #VMEXIT exit codes and the encodings of the EXITINFO fields (AMD APM Vol. 2 Appendix C, 15.7, 15.10).

The EXITCODE field of the VMCB (offset 070h) says why the guest stopped.
The intercept bit vectors of the VMCB control area (000h-017h) are laid out so
that bit ``k`` of the 192-bit vector intercepts the event whose exit code is
``k`` (CR reads 0-15, CR writes 16-31, DR reads 32-47, DR writes 48-63,
exceptions 64-95, then word 3 = 60h-7Fh, word 4 = 80h-9Fh, word 5 = A0h-BFh):
:func:`intercept_bit` is that identity.

EXITINFO1/EXITINFO2 (078h/080h) carry exit-specific information:

* IOIO (APM 15.10.2, Figure 15-2): EXITINFO1 = port << 16 | SEG << 10 |
  A64/A32/A16 (bits 9:7) | SZ32/SZ16/SZ8 (bits 6:4) | REP 3 | STR 2 | TYPE 0
  (1 = IN); EXITINFO2 = the RIP of the next instruction.  :func:`ioio_info`.
* MSR (APM 15.11): EXITINFO1 = 0 for RDMSR, 1 for WRMSR.
* MOV CRn / MOV DRn with decode assists (APM 15.33.1): EXITINFO1 bit 63 = 1
  and bits 3:0 = the GPR number; LMSW/CLTS/SMSW leave bit 63 clear.
* INVLPG (APM 15.33.2): EXITINFO1 = the linear address.
* INTn (APM 15.33.3): EXITINFO1 = the vector.
* exceptions (APM 15.12): EXITINFO1 = the error code (if the exception has
  one); #PF: EXITINFO2 = the faulting linear address (CR2 is not written).
* NPF (APM 15.25.6): EXITINFO1 = the #PF-style error code with bits 32/33,
  EXITINFO2 = the faulting guest-physical address.

EXITINTINFO (088h) and EVENTINJ (0A8h) share one format (APM 15.7.2, 15.20):
see :class:`spec.svm.vmcb.EventInj`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

M64 = (1 << 64) - 1


class ExitCode(IntEnum):
    """#VMEXIT codes (APM Vol. 2 Appendix C, Table C-1)."""

    CR0_READ = 0x00
    CR1_READ = 0x01
    CR2_READ = 0x02
    CR3_READ = 0x03
    CR4_READ = 0x04
    CR5_READ = 0x05
    CR6_READ = 0x06
    CR7_READ = 0x07
    CR8_READ = 0x08
    CR9_READ = 0x09
    CR10_READ = 0x0A
    CR11_READ = 0x0B
    CR12_READ = 0x0C
    CR13_READ = 0x0D
    CR14_READ = 0x0E
    CR15_READ = 0x0F
    CR0_WRITE = 0x10
    CR1_WRITE = 0x11
    CR2_WRITE = 0x12
    CR3_WRITE = 0x13
    CR4_WRITE = 0x14
    CR5_WRITE = 0x15
    CR6_WRITE = 0x16
    CR7_WRITE = 0x17
    CR8_WRITE = 0x18
    CR9_WRITE = 0x19
    CR10_WRITE = 0x1A
    CR11_WRITE = 0x1B
    CR12_WRITE = 0x1C
    CR13_WRITE = 0x1D
    CR14_WRITE = 0x1E
    CR15_WRITE = 0x1F
    DR0_READ = 0x20
    DR1_READ = 0x21
    DR2_READ = 0x22
    DR3_READ = 0x23
    DR4_READ = 0x24
    DR5_READ = 0x25
    DR6_READ = 0x26
    DR7_READ = 0x27
    DR8_READ = 0x28
    DR9_READ = 0x29
    DR10_READ = 0x2A
    DR11_READ = 0x2B
    DR12_READ = 0x2C
    DR13_READ = 0x2D
    DR14_READ = 0x2E
    DR15_READ = 0x2F
    DR0_WRITE = 0x30
    DR1_WRITE = 0x31
    DR2_WRITE = 0x32
    DR3_WRITE = 0x33
    DR4_WRITE = 0x34
    DR5_WRITE = 0x35
    DR6_WRITE = 0x36
    DR7_WRITE = 0x37
    DR8_WRITE = 0x38
    DR9_WRITE = 0x39
    DR10_WRITE = 0x3A
    DR11_WRITE = 0x3B
    DR12_WRITE = 0x3C
    DR13_WRITE = 0x3D
    DR14_WRITE = 0x3E
    DR15_WRITE = 0x3F
    EXCP0 = 0x40
    EXCP1 = 0x41
    EXCP2 = 0x42
    EXCP3 = 0x43
    EXCP4 = 0x44
    EXCP5 = 0x45
    EXCP6 = 0x46
    EXCP7 = 0x47
    EXCP8 = 0x48
    EXCP9 = 0x49
    EXCP10 = 0x4A
    EXCP11 = 0x4B
    EXCP12 = 0x4C
    EXCP13 = 0x4D
    EXCP14 = 0x4E
    EXCP15 = 0x4F
    EXCP16 = 0x50
    EXCP17 = 0x51
    EXCP18 = 0x52
    EXCP19 = 0x53
    EXCP20 = 0x54
    EXCP21 = 0x55
    EXCP22 = 0x56
    EXCP23 = 0x57
    EXCP24 = 0x58
    EXCP25 = 0x59
    EXCP26 = 0x5A
    EXCP27 = 0x5B
    EXCP28 = 0x5C
    EXCP29 = 0x5D
    EXCP30 = 0x5E
    EXCP31 = 0x5F
    # aliases by mnemonic (APM Vol. 2 Table 8-1)
    EXCP_DE = 0x40
    EXCP_DB = 0x41
    EXCP_NMI = 0x42
    EXCP_BP = 0x43
    EXCP_OF = 0x44
    EXCP_BR = 0x45
    EXCP_UD = 0x46
    EXCP_NM = 0x47
    EXCP_DF = 0x48
    EXCP_TS = 0x4A
    EXCP_NP = 0x4B
    EXCP_SS = 0x4C
    EXCP_GP = 0x4D
    EXCP_PF = 0x4E
    EXCP_MF = 0x50
    EXCP_AC = 0x51
    EXCP_MC = 0x52
    EXCP_XF = 0x53
    EXCP_VE = 0x54
    EXCP_CP = 0x55
    INTR = 0x60
    NMI = 0x61
    SMI = 0x62
    INIT = 0x63
    VINTR = 0x64
    CR0_SEL_WRITE = 0x65
    IDTR_READ = 0x66
    GDTR_READ = 0x67
    LDTR_READ = 0x68
    TR_READ = 0x69
    IDTR_WRITE = 0x6A
    GDTR_WRITE = 0x6B
    LDTR_WRITE = 0x6C
    TR_WRITE = 0x6D
    RDTSC = 0x6E
    RDPMC = 0x6F
    PUSHF = 0x70
    POPF = 0x71
    CPUID = 0x72
    RSM = 0x73
    IRET = 0x74
    SWINT = 0x75
    INVD = 0x76
    PAUSE = 0x77
    HLT = 0x78
    INVLPG = 0x79
    INVLPGA = 0x7A
    IOIO = 0x7B
    MSR = 0x7C
    TASK_SWITCH = 0x7D
    FERR_FREEZE = 0x7E
    SHUTDOWN = 0x7F
    VMRUN = 0x80
    VMMCALL = 0x81
    VMLOAD = 0x82
    VMSAVE = 0x83
    STGI = 0x84
    CLGI = 0x85
    SKINIT = 0x86
    RDTSCP = 0x87
    ICEBP = 0x88
    WBINVD = 0x89
    MONITOR = 0x8A
    MWAIT = 0x8B
    MWAIT_CONDITIONAL = 0x8C
    XSETBV = 0x8D
    RDPRU = 0x8E
    EFER_WRITE_TRAP = 0x8F
    CR0_WRITE_TRAP = 0x90
    CR1_WRITE_TRAP = 0x91
    CR2_WRITE_TRAP = 0x92
    CR3_WRITE_TRAP = 0x93
    CR4_WRITE_TRAP = 0x94
    CR5_WRITE_TRAP = 0x95
    CR6_WRITE_TRAP = 0x96
    CR7_WRITE_TRAP = 0x97
    CR8_WRITE_TRAP = 0x98
    CR9_WRITE_TRAP = 0x99
    CR10_WRITE_TRAP = 0x9A
    CR11_WRITE_TRAP = 0x9B
    CR12_WRITE_TRAP = 0x9C
    CR13_WRITE_TRAP = 0x9D
    CR14_WRITE_TRAP = 0x9E
    CR15_WRITE_TRAP = 0x9F
    INVLPGB = 0xA0
    INVLPGB_ILLEGAL = 0xA1
    INVPCID = 0xA2
    MCOMMIT = 0xA3
    TLBSYNC = 0xA4
    NPF = 0x400
    AVIC_INCOMPLETE_IPI = 0x401
    AVIC_NOACCEL = 0x402
    VMGEXIT = 0x403
    INVALID = -1
    BUSY = -2


def exitcode_to_u64(code: int) -> int:
    """The 64-bit EXITCODE field value: negative codes (INVALID = -1, BUSY = -2) in two's complement."""
    return code & M64


def exitcode_from_u64(raw: int) -> int:
    """The signed exit code stored in the 64-bit EXITCODE field."""
    return raw - (1 << 64) if raw >> 63 else raw


def exit_name(code: int) -> str:
    """A readable name of an exit code (``EXCP14``, ``IOIO``, ...; unknown codes in hex)."""
    try:
        return ExitCode(code).name
    except ValueError:
        return f"exit {code:#x}"


INTERCEPT_BITS = 192
"""Width of the intercept bit vector at VMCB 000h-017h (six 32-bit words)."""


def intercept_bit(code: int) -> int:
    """The intercept-vector bit that controls exit ``code`` (module docstring); ``ValueError`` if none."""
    if 0 <= code < INTERCEPT_BITS:
        return code
    raise ValueError(f"exit code {code:#x} has no intercept bit")


# -- IOIO EXITINFO1 (APM 15.10.2, Figure 15-2) ---------------------------------------------------
IOIO_TYPE_IN = 1 << 0
IOIO_STR = 1 << 2
IOIO_REP = 1 << 3
IOIO_SZ8, IOIO_SZ16, IOIO_SZ32 = 1 << 4, 1 << 5, 1 << 6
IOIO_A16, IOIO_A32, IOIO_A64 = 1 << 7, 1 << 8, 1 << 9
IOIO_SEG_SHIFT = 10
IOIO_PORT_SHIFT = 16

_SZ = {1: IOIO_SZ8, 2: IOIO_SZ16, 4: IOIO_SZ32}
_AS = {16: IOIO_A16, 32: IOIO_A32, 64: IOIO_A64}


@dataclass(frozen=True)
class IoioInfo:
    """The decoded EXITINFO1 of an IOIO intercept."""

    port: int
    size: int  # 1, 2 or 4 bytes
    is_in: bool
    string: bool
    rep: bool
    address_bits: int  # 16, 32 or 64
    segment: int  # effective segment of OUTS (ES=0 .. GS=5); 0 otherwise

    def encode(self) -> int:
        return ioio_info(self.port, self.size, self.is_in, string=self.string, rep=self.rep,
                         address_bits=self.address_bits, segment=self.segment)

    @classmethod
    def decode(cls, info1: int) -> IoioInfo:
        size = next(n for n, bit in _SZ.items() if info1 & bit)
        abits = next(n for n, bit in _AS.items() if info1 & bit)
        return cls(port=(info1 >> IOIO_PORT_SHIFT) & 0xFFFF, size=size, is_in=bool(info1 & IOIO_TYPE_IN),
                   string=bool(info1 & IOIO_STR), rep=bool(info1 & IOIO_REP), address_bits=abits,
                   segment=(info1 >> IOIO_SEG_SHIFT) & 7)


def ioio_info(port: int, size: int, is_in: bool, *, string: bool = False, rep: bool = False,
              address_bits: int = 16, segment: int = 0) -> int:
    """EXITINFO1 of an IOIO intercept (APM 15.10.2): the fields of :class:`IoioInfo` packed."""
    return ((port & 0xFFFF) << IOIO_PORT_SHIFT | (segment & 7) << IOIO_SEG_SHIFT | _AS[address_bits]
            | _SZ[size] | (IOIO_REP if rep else 0) | (IOIO_STR if string else 0) | (IOIO_TYPE_IN if is_in else 0))


# -- decode assists (APM 15.33) ------------------------------------------------------------------
MOV_CR_VALID = 1 << 63
"""EXITINFO1 bit 63 of a CR/DR access intercept: the access was a MOV and bits 3:0 name its GPR."""

# -- nested page fault EXITINFO1 (APM 15.25.6) ----------------------------------------------------
NPF_FINAL_TRANSLATION = 1 << 32
NPF_GUEST_PAGE_TABLE = 1 << 33

# -- MSR EXITINFO1 (APM 15.11) ---------------------------------------------------------------------
MSR_READ, MSR_WRITE = 0, 1


__all__ = ["INTERCEPT_BITS", "IOIO_A16", "IOIO_A32", "IOIO_A64", "IOIO_PORT_SHIFT", "IOIO_REP", "IOIO_SEG_SHIFT",
           "IOIO_STR", "IOIO_SZ8", "IOIO_SZ16", "IOIO_SZ32", "IOIO_TYPE_IN", "MOV_CR_VALID", "MSR_READ", "MSR_WRITE",
           "NPF_FINAL_TRANSLATION", "NPF_GUEST_PAGE_TABLE", "ExitCode", "IoioInfo", "exit_name",
           "exitcode_from_u64", "exitcode_to_u64", "intercept_bit", "ioio_info"]
