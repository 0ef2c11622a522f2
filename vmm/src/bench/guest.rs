//! The bench guest, assembled with iced-x86: one measurement routine per kind of exit, plus the few
//! stubs around them. No kernel and no firmware: nvmm's bench runner loads the code, points the
//! vCPU at one routine at a time (at CPL 0 or 3, see `exits.rs`) and reads the results from guest
//! memory. The same routines, wrapped in a PVH ELF by [`pvh_image`], also boot under any VMM that
//! loads PVH kernels (nvmm itself, QEMU) and print their raw results on COM1.
//!
//! # The routine contract
//! Entered in 64-bit mode with `rdi` = iterations (>= 1), `rsi` = where to store one `u32` of TSC
//! cycles per iteration, `rbx`, `ecx`, `r9`, `r10` = what the kind needs ([`Inputs`]), and a
//! return address on the stack. Each iteration (but `hlt-irq`'s, see [`hlt_routine`]) is
//!
//! ```text
//!   pre      (untimed: e.g. arm a self-IPI)
//!   lfence; rdtsc; mov r8d, eax                  t0
//!   setup    (timed: at most two register moves, for operands rdtsc clobbered)
//!   op       (the instruction that exits)
//!   lfence; rdtsc; sub eax, r8d; mov [rsi], eax  t1 - t0
//!   post     (untimed: e.g. EOI)
//! ```
//!
//! The `loop` kind has no setup and no op: its samples are the cost of the timing itself, which
//! the report subtracts from every other kind measured at the same CPL. Only the low 32 bits of
//! the TSC are kept: a difference is exact as long as one iteration takes under 2^32 cycles.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::host::Vendor;
use crate::memory::layout::{APIC_START, VIRTIO_MMIO_START};
use crate::vcpu::regs::{gdt_entry, GDT_CODE64, GDT_CODE64_USER, GDT_DATA, GDT_DATA_USER, GDT_TSS64};

// ---- The guest's memory map (guest-physical = guest-virtual: the page tables identity-map it) ----

/// Code, at 1 MiB: the lowest address nvmm's ELF loader accepts, so the PVH image links there too.
pub const CODE_START: u64 = 0x10_0000;
/// The bench's own GDT, IDT and 64-bit TSS.
pub const GDT_START: u64 = 0x11_0000;
pub const IDT_START: u64 = 0x11_1000;
pub const TSS_START: u64 = 0x11_2000;
/// Stack tops: ring 0 (also the TSS's RSP0, used by exceptions taken at CPL 3) and ring 3.
pub const STACK0_TOP: u64 = 0x11_8000;
pub const STACK3_TOP: u64 = 0x12_0000;
/// Page tables the PVH image builds for itself (the bench runner uses nvmm's boot tables).
const IMAGE_PML4: u64 = 0x13_0000;
const IMAGE_PDPT: u64 = 0x13_1000;
const IMAGE_PD: u64 = 0x13_2000;
/// One `u32` per iteration, reused by every routine.
pub const RESULTS_START: u64 = 0x20_0000;

// ---- Selectors of the bench GDT ----

pub const SEL_CODE0: u16 = 0x08;
pub const SEL_DATA0: u16 = 0x10;
/// Ring-3 selectors carry RPL 3.
pub const SEL_DATA3: u16 = 0x18 | 3;
pub const SEL_CODE3: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;

// ---- What the routines touch ----

/// Port I/O that nvmm (or QEMU) handles in userspace: the POST-code port, which no device of the
/// bench VM (or of QEMU's microvm) claims.
pub const PORT_USER: u8 = 0x80;
/// Port I/O completed in the kernel: an ioeventfd matching any write.
pub const PORT_IOEVENTFD: u8 = 0x81;
/// "Routine finished": the return address the runner leaves on the stack leads here.
pub const PORT_DONE: u8 = 0x8e;
/// "Exception": the IDT stubs write the vector number here.
pub const PORT_FAULT: u8 = 0x8f;
/// MMIO handled in userspace: the first virtio-mmio window (empty in the bench VM).
pub const MMIO_USER: u64 = VIRTIO_MMIO_START;
/// MMIO completed in the kernel: virtio-mmio's QueueNotify register of the second window, an
/// ioeventfd matching [`MMIO_DATAMATCH`] as virtio-mmio devices use it.
pub const MMIO_IOEVENTFD: u64 = VIRTIO_MMIO_START + 0x1000 + 0x50;
pub const MMIO_DATAMATCH: u32 = 0;
/// IA32_MISC_ENABLE: an MSR KVM emulates itself on every vendor (never passed through to hardware),
/// so both rdmsr and wrmsr exit and are handled in the kernel.
pub const MSR_BENCH: u32 = 0x1a0;
/// The interrupt vector of the LAPIC timer that wakes `hlt`.
pub const IRQ_VECTOR: u8 = 0x40;
/// IA32_TSC_DEADLINE: the LAPIC timer fires when the TSC reaches it.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// KVM_HC_VAPIC_POLL_IRQ: the hypercall KVM answers with 0 and nothing else.
const KVM_HC_VAPIC_POLL_IRQ: u32 = 1;

// Local APIC registers (xAPIC MMIO), relative to APIC_START.
const APIC_EOI: u32 = 0xb0;
const APIC_LVTT: u32 = 0x320;
/// LVT timer: TSC-deadline mode (bits 18:17 = 10), unmasked, IRQ_VECTOR.
const LVTT_TSC_DEADLINE: u32 = (2 << 17) | IRQ_VECTOR as u32;

// COM1, for the PVH image's output.
const COM1_DATA: u16 = 0x3f8;
const COM1_LSR: u16 = 0x3fd;
/// LSR bit 5: the transmit holding register is empty.
const LSR_THRE: u8 = 0x20;

/// The kinds of measurement, in the order the runner takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The timing alone: subtracted from every other kind.
    Loop,
    Cpuid,
    PioUser,
    PioIoeventfd,
    MmioUser,
    MmioIoeventfd,
    Rdmsr,
    Wrmsr,
    HltIrq,
    Hypercall,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Loop,
        Kind::Cpuid,
        Kind::PioUser,
        Kind::PioIoeventfd,
        Kind::MmioUser,
        Kind::MmioIoeventfd,
        Kind::Rdmsr,
        Kind::Wrmsr,
        Kind::HltIrq,
        Kind::Hypercall,
    ];

    /// Short name, as in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Loop => "loop",
            Kind::Cpuid => "cpuid",
            Kind::PioUser => "pio-user",
            Kind::PioIoeventfd => "pio-ioeventfd",
            Kind::MmioUser => "mmio-user",
            Kind::MmioIoeventfd => "mmio-ioeventfd",
            Kind::Rdmsr => "rdmsr",
            Kind::Wrmsr => "wrmsr",
            Kind::HltIrq => "hlt-irq",
            Kind::Hypercall => "hypercall",
        }
    }

    /// Whether the instruction is privileged (#GP at CPL 3 even with IOPL 3).
    pub fn needs_cpl0(self) -> bool {
        matches!(self, Kind::Rdmsr | Kind::Wrmsr | Kind::HltIrq)
    }
}

/// The hypercall instruction of the CPU's vendor. KVM rewrites the other vendor's instruction in
/// guest memory before emulating it, which would measure the emulator, not the exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    Vmcall,
    Vmmcall,
}

impl Hypercall {
    pub fn for_vendor(vendor: &Vendor) -> Hypercall {
        match vendor {
            Vendor::Intel => Hypercall::Vmcall,
            _ => Hypercall::Vmmcall,
        }
    }

    pub fn mnemonic(self) -> &'static str {
        match self {
            Hypercall::Vmcall => "vmcall",
            Hypercall::Vmmcall => "vmmcall",
        }
    }
}

/// Register inputs of a routine besides `rdi`/`rsi` (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    pub rbx: u64,
    pub rcx: u64,
    pub r9: u64,
    pub r10: u64,
}

impl Inputs {
    /// What `kind` expects; `msr_value` is what wrmsr writes back (the MSR's current value),
    /// `hlt_delay` how many TSC cycles after its start an hlt-irq iteration's timer fires.
    pub fn for_kind(kind: Kind, msr_value: u64, hlt_delay: u64) -> Inputs {
        match kind {
            Kind::MmioUser => Inputs { rbx: MMIO_USER, rcx: u64::from(MMIO_DATAMATCH), ..Inputs::default() },
            Kind::MmioIoeventfd => Inputs { rbx: MMIO_IOEVENTFD, rcx: u64::from(MMIO_DATAMATCH), ..Inputs::default() },
            Kind::Rdmsr => Inputs { rcx: u64::from(MSR_BENCH), ..Inputs::default() },
            Kind::Wrmsr => Inputs { rcx: u64::from(MSR_BENCH), r9: msr_value & 0xffff_ffff, r10: msr_value >> 32, ..Inputs::default() },
            Kind::HltIrq => Inputs { rbx: APIC_START, rcx: u64::from(MSR_TSC_DEADLINE), r9: hlt_delay, ..Inputs::default() },
            Kind::Loop | Kind::Cpuid | Kind::PioUser | Kind::PioIoeventfd | Kind::Hypercall => Inputs::default(),
        }
    }
}

/// The guest's code could not be assembled: a bug in this file, never the host's doing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot assemble the bench guest: {0}")]
    Assemble(#[from] IcedError),
}

/// A label on the next instruction.
fn here(a: &mut CodeAssembler) -> Result<CodeLabel, IcedError> {
    let mut label = a.create_label();
    a.set_label(&mut label)?;
    Ok(label)
}

/// Assembles `a` at `base`, keeping what [`CodeAssemblerResult::label_ip`] needs.
fn assemble(a: &mut CodeAssembler, base: u64) -> Result<CodeAssemblerResult, IcedError> {
    a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
}

/// A guest address as the 32-bit operand that holds it (everything here sits below 4 GiB).
fn abs32(addr: u64) -> u32 {
    debug_assert!(addr <= u64::from(u32::MAX));
    addr as u32
}

/// The whole 64-bit TSC in rax.
fn rdtsc64(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// Emits the measurement routine for `kind` (see the module docs for the contract) and returns its
/// entry. hlt-irq's routine sets `hlt` on its hlt, which the interrupt handler needs.
fn routine(a: &mut CodeAssembler, kind: Kind, hypercall: Hypercall, hlt: &mut CodeLabel) -> Result<CodeLabel, IcedError> {
    if kind == Kind::HltIrq {
        return hlt_routine(a, hlt);
    }
    let top = here(a)?;
    a.lfence()?; // earlier instructions finish before the TSC is read
    a.rdtsc()?;
    a.mov(r8d, eax)?; // t0
    match kind {
        Kind::Loop | Kind::HltIrq => {}
        Kind::Cpuid => {
            a.xor(eax, eax)?; // leaf 0
            a.cpuid()?;
        }
        Kind::PioUser => a.out(u32::from(PORT_USER), al)?,
        Kind::PioIoeventfd => a.out(u32::from(PORT_IOEVENTFD), al)?,
        Kind::MmioUser | Kind::MmioIoeventfd => a.mov(dword_ptr(rbx), ecx)?,
        Kind::Rdmsr => a.rdmsr()?, // ecx = MSR
        Kind::Wrmsr => {
            a.mov(eax, r9d)?; // the value, low half
            a.mov(edx, r10d)?; // high half
            a.wrmsr()?;
        }
        Kind::Hypercall => {
            a.mov(eax, KVM_HC_VAPIC_POLL_IRQ)?;
            match hypercall {
                Hypercall::Vmcall => a.vmcall()?,
                Hypercall::Vmmcall => a.vmmcall()?,
            }
        }
    }
    a.lfence()?; // the op has finished
    a.rdtsc()?;
    a.sub(eax, r8d)?; // t1 - t0
    a.mov(dword_ptr(rsi), eax)?;
    next_iteration(a, top)?;
    Ok(top)
}

/// Moves to the next sample and loops back to `top` while iterations remain, then returns.
fn next_iteration(a: &mut CodeAssembler, top: CodeLabel) -> Result<(), IcedError> {
    a.add(rsi, 4)?;
    a.dec(rdi)?;
    a.jnz(top)?;
    a.ret()
}

/// `hlt` woken by an interrupt: each iteration arms the LAPIC timer (TSC-deadline mode) to fire
/// `r9` cycles after its start, halts, and records how long after the deadline the guest runs
/// again: the host's timer interrupt, KVM waking the vCPU and injecting the interrupt, the VM
/// entry and the handler's iretq. The halt exit itself happens before the deadline, as long as
/// `r9` exceeds the arming wrmsr plus the hlt exit, so the runner makes it several times that.
///
/// Interrupts are enabled before the arming wrmsr (STI's shadow covers it), so an interrupt is
/// never left pending while IF = 0 for `sti; hlt` to take: nested KVM (L2 on L1 on TCG) never
/// delivers that one, and the vCPU would stay halted. Should the deadline pass during the wrmsr
/// exit, the interrupt arrives with RIP at the hlt; the handler ([`irq_handler`]) then skips the
/// hlt and sets r15, and the sample is stored as [`EARLY_WAKE`] for the runner to drop.
/// Sets `hlt` on the hlt and returns the routine's entry.
fn hlt_routine(a: &mut CodeAssembler, hlt: &mut CodeLabel) -> Result<CodeLabel, IcedError> {
    let entry = here(a)?;
    a.mov(dword_ptr(rbx + APIC_LVTT), LVTT_TSC_DEADLINE)?; // once
    let top = here(a)?;
    a.xor(r15d, r15d)?; // no early wake yet
    a.lfence()?;
    rdtsc64(a)?; // t0
    a.add(rax, r9)?; // the deadline: in r8, and in edx:eax for the wrmsr
    a.mov(r8, rax)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.sti()?; // its shadow covers the wrmsr
    a.wrmsr()?; // IA32_TSC_DEADLINE (ecx)
    a.set_label(hlt)?;
    a.hlt()?; // the handler returns below
    a.lfence()?;
    a.rdtsc()?;
    a.sub(eax, r8d)?; // t1 - deadline
    let mut store = a.create_label();
    a.test(r15d, r15d)?; // woken before the hlt?
    a.jz(store)?;
    a.mov(eax, EARLY_WAKE)?;
    a.set_label(&mut store)?;
    a.mov(dword_ptr(rsi), eax)?;
    a.cli()?;
    a.mov(dword_ptr(rbx + APIC_EOI), 0u32)?;
    next_iteration(a, top)?;
    Ok(entry)
}

/// The hlt-irq sample of an iteration whose interrupt came before its hlt (see [`hlt_routine`]).
pub const EARLY_WAKE: u32 = u32::MAX;

/// The IRQ_VECTOR handler: if the interrupted RIP is the hlt routine's `hlt`, the interrupt came
/// before the halt: skip the hlt and flag the iteration in r15. Then iretq; the routine sends the
/// EOI. Returns the handler's entry.
fn irq_handler(a: &mut CodeAssembler, hlt: CodeLabel) -> Result<CodeLabel, IcedError> {
    let entry = here(a)?;
    let mut out = a.create_label();
    a.push(rax)?;
    a.lea(rax, ptr(hlt))?;
    a.cmp(qword_ptr(rsp + 8), rax)?; // the interrupted RIP
    a.jne(out)?;
    a.inc(qword_ptr(rsp + 8))?; // resume after the (one-byte) hlt
    a.mov(r15d, 1u32)?; // early wake
    a.set_label(&mut out)?;
    a.pop(rax)?;
    a.iretq()?;
    Ok(entry)
}

/// The bench runner's program: routines, the "done" stub they return to, exception stubs and the
/// interrupt handler. Loaded at [`CODE_START`]; offsets are relative to it.
#[derive(Clone, Debug)]
pub struct Program {
    pub code: Vec<u8>,
    /// Where a routine's `ret` should land: writes [`PORT_DONE`].
    pub done: usize,
    /// Exception stub of vector `v`, `v` < 32.
    pub faults: [usize; 32],
    /// The IRQ_VECTOR handler.
    pub irq: usize,
    routines: Vec<(Kind, usize)>,
}

impl Program {
    pub fn new(hypercall: Hypercall) -> Result<Program, Error> {
        let mut a = CodeAssembler::new(64)?;
        // The runner never resumes the guest after a report; should it, the guest reports again.
        let done = here(&mut a)?;
        a.out(u32::from(PORT_DONE), al)?;
        a.jmp(done)?;
        let mut fault_labels = Vec::new();
        for vector in 0..32u32 {
            let stub = here(&mut a)?;
            a.mov(al, vector)?;
            a.out(u32::from(PORT_FAULT), al)?;
            a.jmp(stub)?;
            fault_labels.push(stub);
        }
        let mut hlt = a.create_label();
        let mut routine_labels = Vec::new();
        for kind in Kind::ALL {
            routine_labels.push((kind, routine(&mut a, kind, hypercall, &mut hlt)?));
        }
        let irq = irq_handler(&mut a, hlt)?;

        let out = assemble(&mut a, CODE_START)?;
        let offset = |label: &CodeLabel| -> Result<usize, IcedError> { Ok((out.label_ip(label)? - CODE_START) as usize) };
        let mut faults = [0; 32];
        for (slot, label) in faults.iter_mut().zip(&fault_labels) {
            *slot = offset(label)?;
        }
        let routines = routine_labels.iter().map(|(kind, label)| Ok((*kind, offset(label)?))).collect::<Result<_, IcedError>>()?;
        Ok(Program { done: offset(&done)?, faults, irq: offset(&irq)?, routines, code: out.inner.code_buffer })
    }

    /// Offset of `kind`'s routine.
    pub fn routine(&self, kind: Kind) -> usize {
        self.routines.iter().find(|(k, _)| *k == kind).map(|(_, o)| *o).unwrap_or(0)
    }

    /// Guest address of an offset.
    pub fn addr(offset: usize) -> u64 {
        CODE_START + offset as u64
    }
}

/// A 16-byte IDT gate: 64-bit interrupt gate (type 0xe), present, DPL 0, to `target` in SEL_CODE0.
fn idt_gate(target: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
    g[2..4].copy_from_slice(&SEL_CODE0.to_le_bytes());
    g[5] = 0x8e; // P = 1, DPL = 0, type = interrupt gate
    g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    g
}

/// The bench GDT: null, ring-0 code and data, ring-3 data and code, then the 16-byte TSS
/// descriptor (its high half is zero: the TSS sits below 4 GiB).
pub fn gdt() -> [u64; 7] {
    [
        0,
        gdt_entry(GDT_CODE64, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_DATA_USER, 0, 0xfffff),
        gdt_entry(GDT_CODE64_USER, 0, 0xfffff),
        gdt_entry(GDT_TSS64, TSS_START as u32, TSS_LIMIT),
        0,
    ]
}

/// A 64-bit TSS is 104 bytes; no I/O bitmap (IOPL 3 is what lets ring 3 do port I/O).
pub const TSS_LIMIT: u32 = 0x67;
/// TSS offsets: RSP0, and the I/O map base (set past the limit: no bitmap).
const TSS_RSP0: u64 = 4;
const TSS_IOMAP_BASE: u64 = 0x66;

/// Writes the bench GDT, IDT (exception stubs and the IRQ handler) and TSS into guest memory, and
/// the program at [`CODE_START`].
pub fn write_tables(mem: &GuestMemoryMmap, program: &Program) -> Result<(), GuestMemoryError> {
    for (i, e) in gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    for (vector, stub) in program.faults.iter().enumerate() {
        mem.write_slice(&idt_gate(Program::addr(*stub)), GuestAddress(IDT_START + 16 * vector as u64))?;
    }
    mem.write_slice(&idt_gate(Program::addr(program.irq)), GuestAddress(IDT_START + 16 * u64::from(IRQ_VECTOR)))?;
    mem.write_obj(STACK0_TOP, GuestAddress(TSS_START + TSS_RSP0))?;
    mem.write_obj(TSS_LIMIT as u16 + 1, GuestAddress(TSS_START + TSS_IOMAP_BASE))?;
    mem.write_slice(&program.code, GuestAddress(CODE_START))
}

/// Size of the GDT and IDT, for the descriptor-table registers.
pub const GDT_LIMIT: u16 = (7 * 8 - 1) as u16;
pub const IDT_LIMIT: u16 = (256 * 16 - 1) as u16;

// ---- The standalone PVH image ----

/// What the PVH image measures: the timing loop and the userspace port I/O exit, the one kind every
/// VMM handles the same way (QEMU has no ioeventfd on an unclaimed port, and no bench MSR policy).
pub const IMAGE_KINDS: [Kind; 2] = [Kind::Loop, Kind::PioUser];
/// How long the image waits after its i8042 reset before it triple-faults (QEMU's microvm has no
/// i8042): 2^30 cycles, 0.4 s at 2.7 GHz, for a VMM's main loop to act on the reset even on a
/// loaded host. The largest wait `cmp rax, imm32` (sign-extended) can take is 2^31 - 1.
const RESET_WAIT_CYCLES: i32 = 1 << 30;
/// An address outside both canonical halves: any access faults.
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;
/// First word of each line the image prints.
pub const IMAGE_TAG: &str = "nvmm-bench-raw";

// What the PVH entry sets to reach long mode.
/// Page-directory entry of a 2 MiB page: present, writable, PS.
const PDE_2M: u32 = 0x83;
/// Page-table entry flags of a PML4 or PDPT entry: present, writable.
const PTE_TABLE: u32 = 0x3;
const CR4_PAE: u32 = 1 << 5;
const IA32_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 1 << 8;
const CR0_PE: u32 = 1;
const CR0_PG: u32 = 1 << 31;

/// Subroutines of the image: COM1 output.
struct Console {
    puts: CodeLabel,
    hex32: CodeLabel,
}

/// `puts` (rsi -> NUL-terminated) and `hex32` (r12d, printed as 8 hex digits and '\n'), over a
/// `putc` (al).
/// Each waits for the UART's transmit register to empty, so no VMM drops a character.
fn console(a: &mut CodeAssembler) -> Result<Console, IcedError> {
    let putc = here(a)?;
    a.mov(r13d, eax)?; // keep the character
    let wait = here(a)?;
    a.mov(edx, u32::from(COM1_LSR))?;
    a.in_(al, dx)?;
    a.test(al, u32::from(LSR_THRE))?;
    a.jz(wait)?;
    a.mov(eax, r13d)?;
    a.mov(edx, u32::from(COM1_DATA))?;
    a.out(dx, al)?;
    a.ret()?;

    let puts = here(a)?;
    let mut end = a.create_label();
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(end)?;
    a.call(putc)?;
    a.inc(rsi)?;
    a.jmp(puts)?;
    a.set_label(&mut end)?;
    a.ret()?;

    let hex32 = here(a)?;
    a.mov(r14d, 8u32)?; // digits left
    let digit = here(a)?;
    a.rol(r12d, 4)?; // next nibble to the bottom
    a.mov(eax, r12d)?;
    a.and(eax, 0xf)?;
    let mut decimal = a.create_label();
    a.cmp(al, 10)?;
    a.jb(decimal)?;
    a.add(al, u32::from(b'a' - b'0' - 10))?;
    a.set_label(&mut decimal)?;
    a.add(al, u32::from(b'0'))?;
    a.call(putc)?;
    a.dec(r14d)?;
    a.jnz(digit)?;
    a.mov(al, u32::from(b'\n'))?;
    a.call(putc)?;
    a.ret()?;
    Ok(Console { puts, hex32 })
}

/// The bench as a standalone PVH ELF: entered in 32-bit protected mode, it maps the first GiB,
/// enters long mode, runs [`IMAGE_KINDS`] for `iterations` each at CPL 0 and prints, on COM1,
/// `nvmm-bench-raw <kind> <iterations>` and one hex cycle count per line for each, then
/// `nvmm-bench-raw end`. It then resets through the i8042 (nvmm) and, should that port be absent
/// (QEMU's microvm), triple-faults: either ends a VMM run with `-no-reboot`.
///
/// Laid out as the data, then the 64-bit code, then the 32-bit entry, which jumps back into it.
pub fn pvh_image(iterations: u32, hypercall: Hypercall) -> Result<Vec<u8>, Error> {
    let data = image_data(iterations);
    let mut a = CodeAssembler::new(64)?;
    let con = console(&mut a)?;
    let mut hlt = a.create_label();
    let mut routines = Vec::new();
    for kind in IMAGE_KINDS {
        routines.push(routine(&mut a, kind, hypercall, &mut hlt)?);
    }
    let long64 = here(&mut a)?;
    a.mov(eax, u32::from(SEL_DATA0))?;
    a.mov(ds, eax)?;
    a.mov(es, eax)?;
    a.mov(ss, eax)?;
    a.mov(esp, abs32(STACK0_TOP))?;
    for (routine, header) in routines.into_iter().zip(&data.headers) {
        run_and_print(&mut a, routine, *header, &con, iterations)?;
    }
    a.mov(esi, data.end_msg)?;
    a.call(con.puts)?;
    stop(&mut a, data.null_idtr)?;

    let code64_at = CODE_START + data.bytes.len() as u64;
    let code64 = assemble(&mut a, code64_at)?;
    let entry = code64_at + code64.inner.code_buffer.len() as u64;
    let entry32 = enter_long_mode(data.gdtr, abs32(code64.label_ip(&long64)?))?.assemble(entry)?;
    let image = [data.bytes, code64.inner.code_buffer, entry32].concat();
    Ok(elf_with_pvh_note(&image, entry))
}

/// The image's data, first in the image, and the guest addresses of its parts.
struct ImageData {
    bytes: Vec<u8>,
    /// lgdt operand: limit and 32-bit base of a three-entry GDT (null, ring-0 code, ring-0 data).
    gdtr: u32,
    /// lidt operand with limit 0: any exception then becomes a triple fault.
    null_idtr: u32,
    /// NUL-terminated header line of each IMAGE_KINDS block, and the closing line.
    headers: Vec<u32>,
    end_msg: u32,
}

fn image_data(iterations: u32) -> ImageData {
    let mut d = Vec::new();
    let addr = |d: &Vec<u8>| abs32(CODE_START + d.len() as u64);
    let gdt_at = addr(&d);
    for e in &gdt()[..3] {
        d.extend(e.to_le_bytes());
    }
    let gdtr = addr(&d);
    d.extend(((3 * 8 - 1) as u16).to_le_bytes()); // limit
    d.extend(gdt_at.to_le_bytes()); // base (lgdt in 32-bit mode reads 32 bits)
    d.extend([0; 2]);
    let null_idtr = addr(&d);
    d.extend([0; 10]);
    let mut headers = Vec::new();
    for kind in IMAGE_KINDS {
        headers.push(addr(&d));
        d.extend(format!("{IMAGE_TAG} {} {iterations}\n\0", kind.name()).as_bytes());
    }
    let end_msg = addr(&d);
    d.extend(format!("{IMAGE_TAG} end\n\0").as_bytes());
    ImageData { bytes: d, gdtr, null_idtr, headers, end_msg }
}

/// The PVH entry (32-bit protected mode, flat segments, paging off, no stack): identity-maps the
/// first GiB with 2 MiB pages, enables PAE, EFER.LME and paging, and far-jumps to `long64`, the
/// 64-bit code that loads the data segments and the stack.
fn enter_long_mode(gdtr: u32, long64: u32) -> Result<CodeAssembler, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    a.mov(edi, abs32(IMAGE_PD))?;
    a.mov(eax, PDE_2M)?;
    a.mov(ecx, 512u32)?; // entries: the first GiB
    let fill = here(&mut a)?;
    a.mov(dword_ptr(edi), eax)?;
    a.mov(dword_ptr(edi + 4), 0u32)?;
    a.add(eax, 0x20_0000u32)?;
    a.add(edi, 8)?;
    a.loop_(fill)?;
    a.mov(dword_ptr(abs32(IMAGE_PDPT)), abs32(IMAGE_PD) | PTE_TABLE)?;
    a.mov(dword_ptr(abs32(IMAGE_PML4)), abs32(IMAGE_PDPT) | PTE_TABLE)?;
    a.mov(eax, abs32(IMAGE_PML4))?;
    a.mov(cr3, eax)?;
    a.mov(eax, cr4)?;
    a.or(eax, CR4_PAE)?;
    a.mov(cr4, eax)?;
    a.mov(ecx, IA32_EFER)?;
    a.rdmsr()?;
    a.or(eax, EFER_LME)?;
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, CR0_PG | CR0_PE)?;
    a.mov(cr0, eax)?; // long mode, still 32-bit code
    a.lgdt(ptr(gdtr))?;
    a.jmp_far(SEL_CODE0, long64)?;
    Ok(a)
}

/// Runs one routine, then prints its header line and its samples.
fn run_and_print(a: &mut CodeAssembler, routine: CodeLabel, header: u32, con: &Console, iterations: u32) -> Result<(), IcedError> {
    a.mov(edi, iterations)?;
    a.mov(esi, abs32(RESULTS_START))?;
    a.call(routine)?;
    a.mov(esi, header)?;
    a.call(con.puts)?;
    a.mov(ebx, abs32(RESULTS_START))?;
    a.mov(r15d, iterations)?;
    let dump = here(a)?;
    a.mov(r12d, dword_ptr(rbx))?;
    a.call(con.hex32)?;
    a.add(rbx, 4)?;
    a.dec(r15d)?;
    a.jnz(dump)
}

/// Ends the run: i8042 reset (nvmm), then after RESET_WAIT_CYCLES a triple fault (QEMU's microvm
/// has no i8042).
fn stop(a: &mut CodeAssembler, null_idtr: u32) -> Result<(), IcedError> {
    a.mov(al, 0xfeu32)?; // i8042: pulse reset
    a.out(0x64u32, al)?;
    // Wait RESET_WAIT_CYCLES for a VMM's reset to take effect: the vCPU runs on while the VMM's main
    // loop handles it, and must not fault before (a fault can be reported first).
    rdtsc64(a)?;
    a.mov(r8, rax)?; // start
    let wait = here(a)?;
    a.pause()?;
    rdtsc64(a)?;
    a.sub(rax, r8)?; // elapsed
    a.cmp(rax, RESET_WAIT_CYCLES)?;
    a.jb(wait)?;
    a.lidt(ptr(u64::from(null_idtr)))?;
    // A load from a non-canonical address: #GP, which with no IDT becomes a triple fault. (Not
    // int3: KVM's instruction emulator, which runs CPL 0 on PVM, cannot execute it.)
    a.mov(al, byte_ptr(NON_CANONICAL))?;
    a.hlt() // not reached
}

/// Wraps `code` (linked at CODE_START) in an ELF64 executable with one PT_LOAD segment and a
/// PT_NOTE holding the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), which nvmm's loader and
/// QEMU's `-kernel` both look for.
fn elf_with_pvh_note(code: &[u8], entry: u64) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let note_off = EHDR + 2 * PHDR;
    // Note: namesz, descsz, type, "Xen\0", then the entry as a 64-bit word (QEMU reads 8 bytes).
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes());
    note.extend(8u32.to_le_bytes());
    note.extend(XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend(b"Xen\0");
    note.extend(entry.to_le_bytes());
    let code_off = 0x1000u64;

    let mut e = Vec::new();
    e.extend(b"\x7fELF");
    e.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, System V ABI
    e.extend([0u8; 8]);
    e.extend(2u16.to_le_bytes()); // ET_EXEC
    e.extend(62u16.to_le_bytes()); // EM_X86_64
    e.extend(1u32.to_le_bytes()); // EV_CURRENT
    e.extend(entry.to_le_bytes()); // e_entry (the PVH note is what loaders use)
    e.extend(EHDR.to_le_bytes()); // e_phoff
    e.extend(0u64.to_le_bytes()); // e_shoff: no sections
    e.extend(0u32.to_le_bytes()); // e_flags
    for v in [EHDR as u16, PHDR as u16, 2, 64, 0, 0] {
        e.extend(v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    // PT_LOAD, R+W+X: code, data and the (zero) memory after it.
    e.extend(1u32.to_le_bytes());
    e.extend(7u32.to_le_bytes());
    for v in [code_off, CODE_START, CODE_START, code.len() as u64, code.len() as u64, 0x1000] {
        e.extend(v.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    // PT_NOTE, aligned to 4 as note sections are.
    e.extend(4u32.to_le_bytes());
    e.extend(4u32.to_le_bytes());
    for v in [note_off, 0, 0, note.len() as u64, note.len() as u64, 4] {
        e.extend(v.to_le_bytes());
    }
    e.extend(&note);
    e.resize(code_off as usize, 0);
    e.extend(code);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn loop_routine_is_timing_only() {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut hlt = a.create_label();
        routine(&mut a, Kind::Loop, Hypercall::Vmmcall, &mut hlt).unwrap();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x0f, 0xae, 0xe8, 0x0f, 0x31, 0x41, 0x89, 0xc0,       // lfence; rdtsc; mov r8d, eax
            0x0f, 0xae, 0xe8, 0x0f, 0x31, 0x44, 0x29, 0xc0,       // lfence; rdtsc; sub eax, r8d
            0x89, 0x06, 0x48, 0x83, 0xc6, 0x04, 0x48, 0xff, 0xcf, // mov [rsi], eax; add rsi, 4; dec rdi
            0x75, 0xe5,                                           // jnz top (-27)
            0xc3,                                                 // ret
        ];
        assert_eq!(a.assemble(CODE_START).unwrap(), expected);
    }

    #[test]
    fn each_kind_has_its_exiting_instruction_between_the_timestamps() {
        let p = Program::new(Hypercall::Vmmcall).unwrap();
        let ops: [(Kind, &[u8]); 8] = [
            (Kind::Cpuid, &[0x31, 0xc0, 0x0f, 0xa2]),
            (Kind::PioUser, &[0xe6, PORT_USER]),
            (Kind::PioIoeventfd, &[0xe6, PORT_IOEVENTFD]),
            (Kind::MmioUser, &[0x89, 0x0b]),
            (Kind::MmioIoeventfd, &[0x89, 0x0b]),
            (Kind::Rdmsr, &[0x0f, 0x32]),
            (Kind::Wrmsr, &[0x44, 0x89, 0xc8, 0x44, 0x89, 0xd2, 0x0f, 0x30]),
            (Kind::Hypercall, &[0xb8, 1, 0, 0, 0, 0x0f, 0x01, 0xd9]),
        ];
        let t0: &[u8] = &[0x0f, 0x31, 0x41, 0x89, 0xc0];
        let t1: &[u8] = &[0x0f, 0xae, 0xe8, 0x0f, 0x31, 0x44, 0x29, 0xc0];
        for (kind, op) in ops {
            let code = &p.code[p.routine(kind)..];
            let start = find(code, t0).unwrap() + t0.len();
            assert_eq!(&code[start..start + op.len()], op, "{kind:?}");
            assert_eq!(&code[start + op.len()..start + op.len() + t1.len()], t1, "{kind:?}");
        }
        let intel = Program::new(Hypercall::Vmcall).unwrap();
        assert!(find(&intel.code[intel.routine(Kind::Hypercall)..], &[0x0f, 0x01, 0xc1]).is_some());
    }

    #[test]
    fn hlt_routine_arms_the_deadline_halts_and_eois_after_t1() {
        let p = Program::new(Hypercall::Vmmcall).unwrap();
        let code = &p.code[p.routine(Kind::HltIrq)..];
        // LVT timer: TSC-deadline mode, vector 0x40.
        assert_eq!(&code[..10], &[0xc7, 0x83, 0x20, 0x03, 0, 0, 0x40, 0, 0x04, 0]);
        let arm = find(code, &[0xfb, 0x0f, 0x30, 0xf4]).unwrap(); // sti; wrmsr; hlt
        let t1 = find(code, &[0x0f, 0xae, 0xe8, 0x0f, 0x31, 0x44, 0x29, 0xc0]).unwrap();
        assert_eq!(t1, arm + 4);
        // An early wake stores EARLY_WAKE: test r15d, r15d; jz store; mov eax, -1; store: mov [rsi], eax.
        assert_eq!(&code[t1 + 8..t1 + 18], &[0x45, 0x85, 0xff, 0x74, 0x05, 0xb8, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&code[t1 + 18..t1 + 20], &[0x89, 0x06]);
        // The handler compares the interrupted RIP with the hlt's address.
        let hlt_addr = Program::addr(p.routine(Kind::HltIrq) + arm + 3);
        // push rax; lea rax, [rip + disp32]: the hlt's address.
        let h = &p.code[p.irq..];
        assert_eq!(&h[..4], &[0x50, 0x48, 0x8d, 0x05]);
        let disp = i32::from_le_bytes(h[4..8].try_into().unwrap());
        assert_eq!(Program::addr(p.irq + 8).wrapping_add_signed(disp.into()), hlt_addr);
        // cmp [rsp + 8], rax; jne out; inc qword [rsp + 8]; mov r15d, 1; out: pop rax; iretq.
        #[rustfmt::skip]
        let rest: &[u8] = &[
            0x48, 0x39, 0x44, 0x24, 0x08, 0x75, 0x0b, 0x48, 0xff, 0x44, 0x24, 0x08,
            0x41, 0xbf, 1, 0, 0, 0, 0x58, 0x48, 0xcf,
        ];
        assert_eq!(&h[8..], rest);
        let eoi = find(code, &[0xc7, 0x83, 0xb0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(eoi > t1);
        let inputs = Inputs::for_kind(Kind::HltIrq, 0, 5000);
        assert_eq!((inputs.rbx, inputs.rcx, inputs.r9), (APIC_START, 0x6e0, 5000));
    }

    #[test]
    fn routines_return_and_stubs_report() {
        let p = Program::new(Hypercall::Vmmcall).unwrap();
        assert_eq!(&p.code[p.done..p.done + 4], &[0xe6, PORT_DONE, 0xeb, 0xfc]);
        assert_eq!(&p.code[p.faults[13]..p.faults[13] + 6], &[0xb0, 13, 0xe6, PORT_FAULT, 0xeb, 0xfa]);
        for kind in Kind::ALL {
            let start = p.routine(kind);
            let end = Kind::ALL.iter().map(|k| p.routine(*k)).filter(|o| *o > start).min().unwrap_or(p.irq);
            assert_eq!(p.code[end - 1], 0xc3, "{kind:?} ends with ret");
        }
    }

    #[test]
    fn gates_and_descriptors() {
        let g = idt_gate(0x1234_5678_9abc);
        assert_eq!(g, [0xbc, 0x9a, 0x08, 0, 0, 0x8e, 0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        let gdt = gdt();
        assert_eq!((gdt[4] >> 45) & 3, 3, "user code DPL 3");
        assert_eq!((gdt[4] >> 53) & 1, 1, "user code is 64-bit");
        assert_eq!((gdt[3] >> 45) & 3, 3, "user data DPL 3");
        assert_eq!(usize::from(SEL_TSS) / 8, 5);
        assert_eq!(usize::from(SEL_CODE3 & !3) / 8, 4);
    }

    #[test]
    fn tables_land_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let p = Program::new(Hypercall::Vmmcall).unwrap();
        write_tables(&mem, &p).unwrap();
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(GDT_START + 8), gdt()[1]);
        assert_eq!(r(TSS_START + TSS_RSP0), STACK0_TOP);
        let gate = r(IDT_START + 16 * u64::from(IRQ_VECTOR));
        assert_eq!(gate & 0xffff, Program::addr(p.irq) & 0xffff);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(CODE_START + p.irq as u64)).unwrap(), 0x50);
    }

    #[test]
    fn pvh_image_is_an_elf_with_the_entry_note() {
        let img = pvh_image(1000, Hypercall::Vmmcall).unwrap();
        assert_eq!(&img[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([img[56], img[57]]), 2, "two program headers");
        let note = find(&img, b"Xen\0").unwrap();
        assert_eq!(u32::from_le_bytes(img[note - 4..note].try_into().unwrap()), 18);
        let entry = u64::from_le_bytes(img[note + 4..note + 12].try_into().unwrap());
        let entry_at = 0x1000 + (entry - CODE_START) as usize;
        // The entry starts by filling the page directory: mov edi, IMAGE_PD.
        assert_eq!(&img[entry_at..entry_at + 5], &[0xbf, 0x00, 0x20, 0x13, 0x00]);
        assert!(find(&img, b"nvmm-bench-raw pio-user 1000\n\0").is_some());
        assert!(find(&img, b"nvmm-bench-raw end\n\0").is_some());
    }
}

