"""The opcode map as data (Intel SDM Vol. 2D Appendix A; AMD APM Vol. 3 Appendix A).

One row per instruction form: ``opcode | mnemonic | operands | attributes``.

Opcode column
    Hex bytes of the opcode.  A leading ``F3``/``66``/``F2`` before ``0F`` or
    ``90`` is a mandatory prefix.  ``/0``-``/7``: the ModRM reg field extends the
    opcode; ``/r``: a ModRM byte follows; ``=XX``: the whole ModRM byte is
    ``XX`` (register forms of the system groups); ``+r``: a register number in
    the low three bits (8 rows); ``+cc``: a condition code in the low four
    bits (16 rows).

Operand column (Appendix A.2 addressing methods and operand types)
    ``E`` ModRM r/m (register or memory), ``G`` ModRM reg, ``M`` r/m memory
    only (#UD for a register), ``R`` r/m register only (the mod field is
    ignored and read as 11b, SDM Vol. 2B MOV--Move to/from Control
    Registers), ``S`` ModRM reg as a segment register (6, 7 reserved: #UD),
    ``C``/``D`` ModRM reg (+ REX.R) as a control/debug register (CR0, CR2-CR4,
    CR8 and DR0-DR7 exist; the others are #UD),
    ``I`` immediate, ``Is`` immediate sign-extended to the operand size, ``J``
    relative offset, ``O`` moffs (address-size offset), ``X`` DS:rSI, ``Y``
    ES:rDI, ``A`` direct far pointer, ``Z`` register in the opcode's low bits.
    Sizes: ``b`` 8, ``w`` 16, ``d`` 32, ``q`` 64, ``dq`` 128, ``v`` operand
    size, ``z`` 16 or 32 (32 for operand size 64), ``y`` 32 or 64, ``p`` far
    pointer (16-bit selector + operand-size offset), ``a`` two operand-size
    bounds, ``s`` 6- or 10-byte descriptor-table pseudo-descriptor, ``vw``
    operand size for a register and 16 bits for memory.  Fixed operands:
    ``AL``, ``CL``, ``DX``, ``rAX`` (operand size), ``eAX`` (z), ``1``, and
    segment registers ``ES CS SS DS FS GS``.

Attribute column
    ``lock`` LOCK allowed (with a memory destination; otherwise #UD);
    ``i64`` #UD in 64-bit mode; ``o64`` only in 64-bit mode; ``d64`` default
    operand size 64 in 64-bit mode (66 selects 16, no 32); ``f64`` near
    branch: operand size 64 in 64-bit mode (Intel ignores 66; AMD honours it,
    APM Vol. 3 1.2.5 -- the spec follows the configured vendor);
    ``rep`` F2/F3 repeat; ``repe`` F3 = REPE, F2 = REPNE; ``rexw``/``norexw``
    the row applies only with/without REX.W; ``nat`` operand size is the
    mode's natural width, 64 in 64-bit mode and 32 otherwise, 66 and REX.W
    ignored (MOV CR/DR); ``amd32`` far-pointer rows where AMD ignores REX.W
    (no m16:64 form, APM Vol. 3 CALL/JMP (Far), LSS/LFS/LGS) -- with the
    vendor ``amd`` REX.W gives operand size 32 (66 is still overridden); ``vex`` the opcode byte is also
    the VEX (C4/C5) or EVEX (62) escape: in 64-bit mode, and with ModRM.mod =
    11b in the other modes, the bytes are a VEX/EVEX instruction the spec does
    not model (SDM Vol. 2A 2.3.5 and 2.7.1; the decoder reports
    ``Unimplemented``); ``names=A/B/C`` assembler name
    for operand size 16/32/64; ``anames=`` the same by address size;
    ``ud`` the encoding is reserved and raises #UD.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

CONDITIONS = ("O", "NO", "B", "AE", "E", "NE", "BE", "A", "S", "NS", "P", "NP", "L", "GE", "LE", "G")
"""Condition-code suffixes by the low opcode nibble (SDM Vol. 1 Appendix B)."""

TABLE = """
# --- one-byte opcodes: ALU block (A.3 Table A-2) -----------------------------
00 /r      | ADD     | Eb,Gb     | lock
01 /r      | ADD     | Ev,Gv     | lock
02 /r      | ADD     | Gb,Eb     |
03 /r      | ADD     | Gv,Ev     |
04         | ADD     | AL,Ib     |
05         | ADD     | rAX,Iz    |
06         | PUSH    | ES        | i64
07         | POP     | ES        | i64
08 /r      | OR      | Eb,Gb     | lock
09 /r      | OR      | Ev,Gv     | lock
0A /r      | OR      | Gb,Eb     |
0B /r      | OR      | Gv,Ev     |
0C         | OR      | AL,Ib     |
0D         | OR      | rAX,Iz    |
0E         | PUSH    | CS        | i64
10 /r      | ADC     | Eb,Gb     | lock
11 /r      | ADC     | Ev,Gv     | lock
12 /r      | ADC     | Gb,Eb     |
13 /r      | ADC     | Gv,Ev     |
14         | ADC     | AL,Ib     |
15         | ADC     | rAX,Iz    |
16         | PUSH    | SS        | i64
17         | POP     | SS        | i64
18 /r      | SBB     | Eb,Gb     | lock
19 /r      | SBB     | Ev,Gv     | lock
1A /r      | SBB     | Gb,Eb     |
1B /r      | SBB     | Gv,Ev     |
1C         | SBB     | AL,Ib     |
1D         | SBB     | rAX,Iz    |
1E         | PUSH    | DS        | i64
1F         | POP     | DS        | i64
20 /r      | AND     | Eb,Gb     | lock
21 /r      | AND     | Ev,Gv     | lock
22 /r      | AND     | Gb,Eb     |
23 /r      | AND     | Gv,Ev     |
24         | AND     | AL,Ib     |
25         | AND     | rAX,Iz    |
27         | DAA     |           | i64
28 /r      | SUB     | Eb,Gb     | lock
29 /r      | SUB     | Ev,Gv     | lock
2A /r      | SUB     | Gb,Eb     |
2B /r      | SUB     | Gv,Ev     |
2C         | SUB     | AL,Ib     |
2D         | SUB     | rAX,Iz    |
2F         | DAS     |           | i64
30 /r      | XOR     | Eb,Gb     | lock
31 /r      | XOR     | Ev,Gv     | lock
32 /r      | XOR     | Gb,Eb     |
33 /r      | XOR     | Gv,Ev     |
34         | XOR     | AL,Ib     |
35         | XOR     | rAX,Iz    |
37         | AAA     |           | i64
38 /r      | CMP     | Eb,Gb     |
39 /r      | CMP     | Ev,Gv     |
3A /r      | CMP     | Gb,Eb     |
3B /r      | CMP     | Gv,Ev     |
3C         | CMP     | AL,Ib     |
3D         | CMP     | rAX,Iz    |
3F         | AAS     |           | i64
# --- one-byte opcodes 40-7F ---------------------------------------------------
40+r       | INC     | Zv        | i64
48+r       | DEC     | Zv        | i64
50+r       | PUSH    | Zv        | d64
58+r       | POP     | Zv        | d64
60         | PUSHA   |           | i64 names=PUSHA/PUSHAD/PUSHAD
61         | POPA    |           | i64 names=POPA/POPAD/POPAD
62 /r      | BOUND   | Gv,Ma     | i64 vex
63 /r      | ARPL    | Ew,Gw     | i64
63 /r      | MOVSXD  | Gv,Ez     | o64
68         | PUSH    | Iz        | d64
69 /r      | IMUL    | Gv,Ev,Iz  |
6A         | PUSH    | Ibs       | d64
6B /r      | IMUL    | Gv,Ev,Ibs |
6C         | INS     | Yb,DX     | rep names=INSB/INSB/INSB
6D         | INS     | Yz,DX     | rep names=INSW/INSD/INSD
6E         | OUTS    | DX,Xb     | rep names=OUTSB/OUTSB/OUTSB
6F         | OUTS    | DX,Xz     | rep names=OUTSW/OUTSD/OUTSD
70+cc      | JCC     | Jb        | f64
# --- one-byte opcodes 80-BF -----------------------------------------------------
80 /0      | ADD     | Eb,Ib     | lock
80 /1      | OR      | Eb,Ib     | lock
80 /2      | ADC     | Eb,Ib     | lock
80 /3      | SBB     | Eb,Ib     | lock
80 /4      | AND     | Eb,Ib     | lock
80 /5      | SUB     | Eb,Ib     | lock
80 /6      | XOR     | Eb,Ib     | lock
80 /7      | CMP     | Eb,Ib     |
81 /0      | ADD     | Ev,Iz     | lock
81 /1      | OR      | Ev,Iz     | lock
81 /2      | ADC     | Ev,Iz     | lock
81 /3      | SBB     | Ev,Iz     | lock
81 /4      | AND     | Ev,Iz     | lock
81 /5      | SUB     | Ev,Iz     | lock
81 /6      | XOR     | Ev,Iz     | lock
81 /7      | CMP     | Ev,Iz     |
82 /0      | ADD     | Eb,Ib     | lock i64
82 /1      | OR      | Eb,Ib     | lock i64
82 /2      | ADC     | Eb,Ib     | lock i64
82 /3      | SBB     | Eb,Ib     | lock i64
82 /4      | AND     | Eb,Ib     | lock i64
82 /5      | SUB     | Eb,Ib     | lock i64
82 /6      | XOR     | Eb,Ib     | lock i64
82 /7      | CMP     | Eb,Ib     | i64
83 /0      | ADD     | Ev,Ibs    | lock
83 /1      | OR      | Ev,Ibs    | lock
83 /2      | ADC     | Ev,Ibs    | lock
83 /3      | SBB     | Ev,Ibs    | lock
83 /4      | AND     | Ev,Ibs    | lock
83 /5      | SUB     | Ev,Ibs    | lock
83 /6      | XOR     | Ev,Ibs    | lock
83 /7      | CMP     | Ev,Ibs    |
84 /r      | TEST    | Eb,Gb     |
85 /r      | TEST    | Ev,Gv     |
86 /r      | XCHG    | Eb,Gb     | lock
87 /r      | XCHG    | Ev,Gv     | lock
88 /r      | MOV     | Eb,Gb     |
89 /r      | MOV     | Ev,Gv     |
8A /r      | MOV     | Gb,Eb     |
8B /r      | MOV     | Gv,Ev     |
8C /r      | MOV     | Evw,Sw    |
8C /6      | UD      |           | ud
8C /7      | UD      |           | ud
8D /r      | LEA     | Gv,M      |
8E /r      | MOV     | Sw,Ew     |
# 8E /1 would load CS: #UD (SDM Vol. 2B MOV).
8E /1      | UD      |           | ud
8E /6      | UD      |           | ud
8E /7      | UD      |           | ud
8F /0      | POP     | Ev        | d64
8F /1      | UD      |           | ud
8F /2      | UD      |           | ud
8F /3      | UD      |           | ud
8F /4      | UD      |           | ud
8F /5      | UD      |           | ud
8F /6      | UD      |           | ud
8F /7      | UD      |           | ud
90         | NOP     |           |
F3 90      | PAUSE   |           |
90+r       | XCHG    | Zv,rAX    |
98         | CBW     |           | names=CBW/CWDE/CDQE
99         | CWD     |           | names=CWD/CDQ/CQO
9A         | CALLF   | Ap        | i64
9B         | WAIT    |           |
9C         | PUSHF   |           | d64 names=PUSHF/PUSHFD/PUSHFQ
9D         | POPF    |           | d64 names=POPF/POPFD/POPFQ
9E         | SAHF    |           |
9F         | LAHF    |           |
A0         | MOV     | AL,Ob     |
A1         | MOV     | rAX,Ov    |
A2         | MOV     | Ob,AL     |
A3         | MOV     | Ov,rAX    |
A4         | MOVS    | Yb,Xb     | rep names=MOVSB/MOVSB/MOVSB
A5         | MOVS    | Yv,Xv     | rep names=MOVSW/MOVSD/MOVSQ
A6         | CMPS    | Xb,Yb     | repe names=CMPSB/CMPSB/CMPSB
A7         | CMPS    | Xv,Yv     | repe names=CMPSW/CMPSD/CMPSQ
A8         | TEST    | AL,Ib     |
A9         | TEST    | rAX,Iz    |
AA         | STOS    | Yb,AL     | rep names=STOSB/STOSB/STOSB
AB         | STOS    | Yv,rAX    | rep names=STOSW/STOSD/STOSQ
AC         | LODS    | AL,Xb     | rep names=LODSB/LODSB/LODSB
AD         | LODS    | rAX,Xv    | rep names=LODSW/LODSD/LODSQ
AE         | SCAS    | AL,Yb     | repe names=SCASB/SCASB/SCASB
AF         | SCAS    | rAX,Yv    | repe names=SCASW/SCASD/SCASQ
B0+r       | MOV     | Zb,Ib     |
B8+r       | MOV     | Zv,Iv     |
# --- one-byte opcodes C0-FF -----------------------------------------------------
C0 /0      | ROL     | Eb,Ib     |
C0 /1      | ROR     | Eb,Ib     |
C0 /2      | RCL     | Eb,Ib     |
C0 /3      | RCR     | Eb,Ib     |
C0 /4      | SHL     | Eb,Ib     |
C0 /5      | SHR     | Eb,Ib     |
C0 /6      | SAL     | Eb,Ib     |
C0 /7      | SAR     | Eb,Ib     |
C1 /0      | ROL     | Ev,Ib     |
C1 /1      | ROR     | Ev,Ib     |
C1 /2      | RCL     | Ev,Ib     |
C1 /3      | RCR     | Ev,Ib     |
C1 /4      | SHL     | Ev,Ib     |
C1 /5      | SHR     | Ev,Ib     |
C1 /6      | SAL     | Ev,Ib     |
C1 /7      | SAR     | Ev,Ib     |
C2         | RET     | Iw        | f64
C3         | RET     |           | f64
C4 /r      | LES     | Gz,Mp     | i64 vex
C5 /r      | LDS     | Gz,Mp     | i64 vex
C6 /0      | MOV     | Eb,Ib     |
C6 /1      | UD      |           | ud
C6 /2      | UD      |           | ud
C6 /3      | UD      |           | ud
C6 /4      | UD      |           | ud
C6 /5      | UD      |           | ud
C6 /6      | UD      |           | ud
C6 /7      | UD      |           | ud
C7 /0      | MOV     | Ev,Iz     |
C7 /1      | UD      |           | ud
C7 /2      | UD      |           | ud
C7 /3      | UD      |           | ud
C7 /4      | UD      |           | ud
C7 /5      | UD      |           | ud
C7 /6      | UD      |           | ud
C7 /7      | UD      |           | ud
C8         | ENTER   | Iw,Ib     | d64
C9         | LEAVE   |           | d64
CA         | RETF    | Iw        |
CB         | RETF    |           |
CC         | INT3    |           |
CD         | INT     | Ib        |
CE         | INTO    |           | i64
CF         | IRET    |           | names=IRET/IRETD/IRETQ
D0 /0      | ROL     | Eb,1      |
D0 /1      | ROR     | Eb,1      |
D0 /2      | RCL     | Eb,1      |
D0 /3      | RCR     | Eb,1      |
D0 /4      | SHL     | Eb,1      |
D0 /5      | SHR     | Eb,1      |
D0 /6      | SAL     | Eb,1      |
D0 /7      | SAR     | Eb,1      |
D1 /0      | ROL     | Ev,1      |
D1 /1      | ROR     | Ev,1      |
D1 /2      | RCL     | Ev,1      |
D1 /3      | RCR     | Ev,1      |
D1 /4      | SHL     | Ev,1      |
D1 /5      | SHR     | Ev,1      |
D1 /6      | SAL     | Ev,1      |
D1 /7      | SAR     | Ev,1      |
D2 /0      | ROL     | Eb,CL     |
D2 /1      | ROR     | Eb,CL     |
D2 /2      | RCL     | Eb,CL     |
D2 /3      | RCR     | Eb,CL     |
D2 /4      | SHL     | Eb,CL     |
D2 /5      | SHR     | Eb,CL     |
D2 /6      | SAL     | Eb,CL     |
D2 /7      | SAR     | Eb,CL     |
D3 /0      | ROL     | Ev,CL     |
D3 /1      | ROR     | Ev,CL     |
D3 /2      | RCL     | Ev,CL     |
D3 /3      | RCR     | Ev,CL     |
D3 /4      | SHL     | Ev,CL     |
D3 /5      | SHR     | Ev,CL     |
D3 /6      | SAL     | Ev,CL     |
D3 /7      | SAR     | Ev,CL     |
D4         | AAM     | Ib        | i64
D5         | AAD     | Ib        | i64
D6         | SALC    |           | i64
D7         | XLAT    |           | names=XLATB/XLATB/XLATB
E0         | LOOPNE  | Jb        | f64
E1         | LOOPE   | Jb        | f64
E2         | LOOP    | Jb        | f64
E3         | JCXZ    | Jb        | f64 anames=JCXZ/JECXZ/JRCXZ
E4         | IN      | AL,Ib     |
E5         | IN      | eAX,Ib    |
E6         | OUT     | Ib,AL     |
E7         | OUT     | Ib,eAX    |
E8         | CALL    | Jz        | f64
E9         | JMP     | Jz        | f64
EA         | JMPF    | Ap        | i64
EB         | JMP     | Jb        | f64
EC         | IN      | AL,DX     |
ED         | IN      | eAX,DX    |
EE         | OUT     | DX,AL     |
EF         | OUT     | DX,eAX    |
F1         | INT1    |           |
F4         | HLT     |           |
F5         | CMC     |           |
F6 /0      | TEST    | Eb,Ib     |
F6 /1      | TEST    | Eb,Ib     |
F6 /2      | NOT     | Eb        | lock
F6 /3      | NEG     | Eb        | lock
F6 /4      | MUL     | Eb        |
F6 /5      | IMUL    | Eb        |
F6 /6      | DIV     | Eb        |
F6 /7      | IDIV    | Eb        |
F7 /0      | TEST    | Ev,Iz     |
F7 /1      | TEST    | Ev,Iz     |
F7 /2      | NOT     | Ev        | lock
F7 /3      | NEG     | Ev        | lock
F7 /4      | MUL     | Ev        |
F7 /5      | IMUL    | Ev        |
F7 /6      | DIV     | Ev        |
F7 /7      | IDIV    | Ev        |
F8         | CLC     |           |
F9         | STC     |           |
FA         | CLI     |           |
FB         | STI     |           |
FC         | CLD     |           |
FD         | STD     |           |
FE /0      | INC     | Eb        | lock
FE /1      | DEC     | Eb        | lock
FE /2      | UD      |           | ud
FE /3      | UD      |           | ud
FE /4      | UD      |           | ud
FE /5      | UD      |           | ud
FE /6      | UD      |           | ud
FE /7      | UD      |           | ud
FF /0      | INC     | Ev        | lock
FF /1      | DEC     | Ev        | lock
FF /2      | CALL    | Ev        | f64
FF /3      | CALLF   | Mp        | amd32
FF /4      | JMP     | Ev        | f64
FF /5      | JMPF    | Mp        | amd32
FF /6      | PUSH    | Ev        | d64
FF /7      | UD      |           | ud
# --- two-byte opcodes 0F xx (A.3 Table A-3) ---------------------------------------
0F 00 /0   | SLDT    | Evw       |
0F 00 /1   | STR     | Evw       |
0F 00 /2   | LLDT    | Ew        |
0F 00 /3   | LTR     | Ew        |
0F 00 /4   | VERR    | Ew        |
0F 00 /5   | VERW    | Ew        |
0F 00 /6   | UD      |           | ud
0F 00 /7   | UD      |           | ud
0F 01 /0   | SGDT    | Ms        |
0F 01 /1   | SIDT    | Ms        |
0F 01 /2   | LGDT    | Ms        |
0F 01 /3   | LIDT    | Ms        |
0F 01 /4   | SMSW    | Evw       |
0F 01 /6   | LMSW    | Ew        |
0F 01 /7   | INVLPG  | M         |
0F 01 =D8  | VMRUN   |           |
0F 01 =D9  | VMMCALL |           |
0F 01 =DA  | VMLOAD  |           |
0F 01 =DB  | VMSAVE  |           |
0F 01 =DC  | STGI    |           |
0F 01 =DD  | CLGI    |           |
0F 01 =DE  | SKINIT  |           |
0F 01 =DF  | INVLPGA |           |
0F 01 =F8  | SWAPGS  |           | o64
0F 01 =F9  | RDTSCP  |           |
0F 02 /r   | LAR     | Gv,Ew     |
0F 03 /r   | LSL     | Gv,Ew     |
0F 05      | SYSCALL |           |
0F 06      | CLTS    |           |
0F 07      | SYSRET  |           | names=SYSRET/SYSRET/SYSRETQ
0F 08      | INVD    |           |
0F 09      | WBINVD  |           |
F3 0F 09   | WBNOINVD |          |
0F 0B      | UD2     |           | ud
# 0F 0D (AMD PREFETCH/PREFETCHW): only the memory form is valid, a register is #UD (AMD 3DNow! manual).
0F 0D /r   | PREFETCH | Mb       |
# 0F 18 /0-/3: the register forms are reserved hint NOPs, not #UD (SDM Vol. 2D Table A-6 group 16).
0F 18 /0   | PREFETCHNTA | Eb    |
0F 18 /1   | PREFETCHT0 | Eb     |
0F 18 /2   | PREFETCHT1 | Eb     |
0F 18 /3   | PREFETCHT2 | Eb     |
0F 18 /4   | NOP     | Ev        |
0F 18 /5   | NOP     | Ev        |
0F 18 /6   | NOP     | Ev        |
0F 18 /7   | NOP     | Ev        |
0F 19 /r   | NOP     | Ev        |
0F 1A /r   | NOP     | Ev        |
0F 1B /r   | NOP     | Ev        |
0F 1C /r   | NOP     | Ev        |
0F 1D /r   | NOP     | Ev        |
0F 1E /r   | NOP     | Ev        |
0F 1F /r   | NOP     | Ev        |
0F 20 /r   | MOV     | Ry,Cy     | nat
0F 21 /r   | MOV     | Ry,Dy     | nat
0F 22 /r   | MOV     | Cy,Ry     | nat
0F 23 /r   | MOV     | Dy,Ry     | nat
0F 30      | WRMSR   |           |
0F 31      | RDTSC   |           |
0F 32      | RDMSR   |           |
0F 33      | RDPMC   |           |
0F 34      | SYSENTER |          |
0F 35      | SYSEXIT |           | names=SYSEXIT/SYSEXIT/SYSEXITQ
0F 40+cc /r | CMOVCC | Gv,Ev     |
0F 80+cc   | JCC     | Jz        | f64
0F 90+cc /r | SETCC  | Eb        |
0F A0      | PUSH    | FS        | d64
0F A1      | POP     | FS        | d64
0F A2      | CPUID   |           |
0F A3 /r   | BT      | Ev,Gv     |
0F A4 /r   | SHLD    | Ev,Gv,Ib  |
0F A5 /r   | SHLD    | Ev,Gv,CL  |
0F A8      | PUSH    | GS        | d64
0F A9      | POP     | GS        | d64
0F AA      | RSM     |           |
0F AB /r   | BTS     | Ev,Gv     | lock
0F AC /r   | SHRD    | Ev,Gv,Ib  |
0F AD /r   | SHRD    | Ev,Gv,CL  |
0F AF /r   | IMUL    | Gv,Ev     |
0F B0 /r   | CMPXCHG | Eb,Gb     | lock
0F B1 /r   | CMPXCHG | Ev,Gv     | lock
0F B2 /r   | LSS     | Gv,Mp     | amd32
0F B3 /r   | BTR     | Ev,Gv     | lock
0F B4 /r   | LFS     | Gv,Mp     | amd32
0F B5 /r   | LGS     | Gv,Mp     | amd32
0F B6 /r   | MOVZX   | Gv,Eb     |
0F B7 /r   | MOVZX   | Gv,Ew     |
# 0F B8 without F3 is JMPE on IA-64 processors only: #UD here.
0F B8      | UD      |           | ud
F3 0F B8 /r | POPCNT | Gv,Ev     |
0F B9 /r   | UD1     | Gv,Ev     | ud
0F BA /0   | UD      |           | ud
0F BA /1   | UD      |           | ud
0F BA /2   | UD      |           | ud
0F BA /3   | UD      |           | ud
0F BA /4   | BT      | Ev,Ib     |
0F BA /5   | BTS     | Ev,Ib     | lock
0F BA /6   | BTR     | Ev,Ib     | lock
0F BA /7   | BTC     | Ev,Ib     | lock
0F BB /r   | BTC     | Ev,Gv     | lock
0F BC /r   | BSF     | Gv,Ev     |
F3 0F BC /r | TZCNT  | Gv,Ev     |
0F BD /r   | BSR     | Gv,Ev     |
F3 0F BD /r | LZCNT  | Gv,Ev     |
0F BE /r   | MOVSX   | Gv,Eb     |
0F BF /r   | MOVSX   | Gv,Ew     |
0F C0 /r   | XADD    | Eb,Gb     | lock
0F C1 /r   | XADD    | Ev,Gv     | lock
0F C7 /1   | CMPXCHG8B | Mq      | lock norexw
0F C7 /1   | CMPXCHG16B | Mdq    | lock rexw
0F C8+r    | BSWAP   | Zv        |
0F FF      | UD0     |           | ud
"""

ATTRS = frozenset({"lock", "i64", "o64", "d64", "f64", "rep", "repe", "rexw", "norexw", "ud", "nat", "amd32", "vex"})


@dataclass(frozen=True)
class Row:
    """One instruction form of the opcode map."""

    opcode: tuple[int, ...]
    mandatory: int | None
    digit: int | None
    modrm_exact: int | None
    has_modrm: bool
    mnemonic: str
    operands: tuple[str, ...]
    attrs: frozenset[str]
    cc: int | None = None
    reg_in_opcode: int | None = None
    names: tuple[str, ...] | None = None
    anames: tuple[str, ...] | None = None
    text: str = ""

    def name_for(self, opsize: int, addrsize: int) -> str:
        if self.anames:
            return self.anames[{16: 0, 32: 1, 64: 2}[addrsize]]
        if self.names:
            return self.names[{8: 0, 16: 0, 32: 1, 64: 2}[opsize]]
        if self.cc is not None:
            return self.mnemonic[:-2] + CONDITIONS[self.cc]
        return self.mnemonic

    @cached_property
    def key(self) -> str:
        """A stable identifier of the form, for coverage and signatures (computed once per row)."""
        ops = ",".join(self.operands)
        cc = "" if self.cc is None else CONDITIONS[self.cc]
        op = " ".join(f"{b:02X}" for b in self.opcode)
        pfx = f"{self.mandatory:02X} " if self.mandatory else ""
        ext = f" /{self.digit}" if self.digit is not None else ""
        ext += f" ={self.modrm_exact:02X}" if self.modrm_exact is not None else ""
        mode = " i64" if "i64" in self.attrs else " o64" if "o64" in self.attrs else ""
        w = " rexw" if "rexw" in self.attrs else ""
        return f"{pfx}{op}{ext} {self.mnemonic.replace('CC', cc) if cc else self.mnemonic} {ops}{mode}{w}".strip()


def _parse_line(line: str) -> list[Row]:
    opcode_col, mnem, ops, attr_col = (c.strip() for c in line.split("|"))
    tokens = opcode_col.split()
    mandatory = None
    if tokens[0] in ("F3", "66", "F2") and len(tokens) > 1 and tokens[1] in ("0F", "90"):
        mandatory = int(tokens.pop(0), 16)
    digit = exact = None
    has_modrm = False
    if tokens[-1].startswith("/"):
        has_modrm = True
        tok = tokens.pop()
        digit = None if tok == "/r" else int(tok[1:])
    elif tokens[-1].startswith("="):
        has_modrm = True
        exact = int(tokens.pop()[1:], 16)
    last = tokens[-1]
    expand: list[tuple[int, int | None, int | None]] = []
    if last.endswith("+r"):
        b = int(last[:-2], 16)
        expand = [(b + r, None, r) for r in range(8)]
    elif last.endswith("+cc"):
        b = int(last[:-3], 16)
        expand = [(b + c, c, None) for c in range(16)]
    else:
        expand = [(int(last, 16), None, None)]
    prefix = tuple(int(t, 16) for t in tokens[:-1])
    attrs = attr_col.split()
    names = anames = None
    flags = set()
    for a in attrs:
        if a.startswith("names="):
            names = tuple(a[6:].split("/"))
        elif a.startswith("anames="):
            anames = tuple(a[7:].split("/"))
        else:
            if a not in ATTRS:
                raise ValueError(f"unknown attribute {a!r} in opcode row: {line}")
            flags.add(a)
    operands = tuple(ops.split(",")) if ops else ()
    return [
        Row(opcode=(*prefix, b), mandatory=mandatory, digit=digit, modrm_exact=exact, has_modrm=has_modrm,
            mnemonic=mnem, operands=operands, attrs=frozenset(flags), cc=cc, reg_in_opcode=r,
            names=names, anames=anames, text=line.strip())
        for b, cc, r in expand
    ]


def load_rows(text: str = TABLE) -> list[Row]:
    rows: list[Row] = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            rows.extend(_parse_line(line))
    return rows


ROWS: list[Row] = load_rows()
"""Every instruction form of the map, in table order."""
