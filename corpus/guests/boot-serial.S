/* boot-serial: real mode -> protected mode -> long mode, printing on the serial port at each stage.
 *
 * A refvmm guest (corpus/guests/boot-serial.bin is the assembled image; tests run the committed
 * bytes, no assembler is needed at replay).  Rebuild with:
 *     as --64 -o boot-serial.o boot-serial.S
 *     ld -Ttext=0x1000 --oformat binary -o boot-serial.bin boot-serial.o
 *
 * Loaded at 0x1000 and entered in real mode with CS = DS = SS = 0 (spec.machine.flat_machine("real")).
 * Needs RAM at 0 .. 2 MiB (page tables at 0x20000) and, for the MMIO part, an mmio-scratch device at
 * 0x200000 (refvmm/devices/scratch.py: ID register at +0, read counter at +8, scratch at +0x10).
 * Output goes to COM1 (3F8h) by polling LSR.THRE (bit 5); on an empty bus (no UART) the LSR reads
 * FFh, so the guest also runs on a bare machine without devices.
 *
 * Final state (checked by tests/test_vmm_guests.py against the bare spec):
 *   RAX = low half of the TSC read in long mode, RDX = high half, R8 = MMIO ID register,
 *   R9 = value read back from the scratch register, R10 = the counter register (read twice:
 *   the second value), R12 = 0x600D, then HLT with interrupts disabled.
 * Transitions follow SDM Vol. 3A 9.9.1 (switching to protected mode) and 10.8.5 / APM Vol. 2 14.6.1
 * (activating long mode: PAE, CR3, EFER.LME, CR0.PG, far jump to a 64-bit code segment).
 */
        .set COM1, 0x3F8
        .set PML4, 0x20000
        .set PDPT, 0x21000
        .set PD, 0x22000
        .set MMIO, 0x200000

        .text
        .code16
        .globl _start
_start:
start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7000, %sp
        /* UART: 8N1 at 9600 baud (DLAB=1, divisor 12, DLAB=0, no interrupts) */
        mov $COM1+3, %dx
        mov $0x80, %al
        out %al, %dx
        mov $COM1, %dx
        mov $12, %al
        out %al, %dx
        mov $COM1+1, %dx
        xor %al, %al
        out %al, %dx
        mov $COM1+3, %dx
        mov $0x03, %al
        out %al, %dx
        mov $COM1+1, %dx
        xor %al, %al
        out %al, %dx
        mov $msg_real, %si
        call puts16
        lgdtl gdt_desc
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $0x08, $prot32

puts16:
        lodsb
        test %al, %al
        jz 2f
        mov %al, %bl
        mov $COM1+5, %dx
1:      in %dx, %al
        test $0x20, %al
        jz 1b
        mov $COM1, %dx
        mov %bl, %al
        out %al, %dx
        jmp puts16
2:      ret

        .code32
prot32:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov %ax, %fs
        mov %ax, %gs
        mov $0x7000, %esp
        mov $msg_prot, %esi
        call puts32
        /* identity map the first 4 MiB with two 2-MiB pages: PML4[0] -> PDPT[0] -> PD[0..1] */
        mov $PML4, %edi
        xor %eax, %eax
        mov $(3 * 4096 / 4), %ecx
        rep stosl
        movl $(PDPT | 3), PML4
        movl $(PD | 3), PDPT
        movl $0x000083, PD
        movl $0x200083, PD + 8
        mov %cr4, %eax
        or $0x20, %eax                  /* CR4.PAE */
        mov %eax, %cr4
        mov $PML4, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx           /* EFER.LME */
        rdmsr
        or $0x100, %eax
        wrmsr
        mov %cr0, %eax
        or $0x80000000, %eax            /* CR0.PG: long mode becomes active (compatibility mode) */
        mov %eax, %cr0
        ljmp $0x18, $long64

puts32:
        lodsb
        test %al, %al
        jz 2f
        mov %al, %bl
        mov $COM1+5, %dx
1:      in %dx, %al
        test $0x20, %al
        jz 1b
        mov $COM1, %dx
        mov %bl, %al
        out %al, %dx
        jmp puts32
2:      ret

        .code64
long64:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7000, %rsp
        lea msg_long(%rip), %rsi
        call puts64
        /* MMIO: the ID register, a scratch write and read-back, the counter twice */
        mov $MMIO, %rbx
        mov (%rbx), %r8d
        movq $0x1234, 0x10(%rbx)
        mov 0x10(%rbx), %r9
        mov 8(%rbx), %r10
        mov 8(%rbx), %r10
        lea msg_done(%rip), %rsi
        call puts64
        mov $0x600D, %r12d
        rdtsc
        hlt

puts64:
        lodsb
        test %al, %al
        jz 2f
        mov %al, %bl
        mov $COM1+5, %dx
1:      in %dx, %al
        test $0x20, %al
        jz 1b
        mov $COM1, %dx
        mov %bl, %al
        out %al, %dx
        jmp puts64
2:      ret

        .p2align 3
gdt:
        .quad 0                         /* null */
        .quad 0x00CF9A000000FFFF        /* 0x08: 32-bit code, DPL 0, 4 GiB */
        .quad 0x00CF92000000FFFF        /* 0x10: data, DPL 0, 4 GiB */
        .quad 0x00AF9A000000FFFF        /* 0x18: 64-bit code (L = 1) */
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .long gdt

msg_real:
        .asciz "refvmm boot: real mode\r\n"
msg_prot:
        .asciz "refvmm boot: protected mode\r\n"
msg_long:
        .asciz "refvmm boot: long mode\r\n"
msg_done:
        .asciz "refvmm boot: MMIO ok, halting\r\n"
