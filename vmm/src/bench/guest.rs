//! The bench guest, hand-assembled: one measurement routine per kind of exit, plus the few
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

/// Machine code being assembled at a known guest address.
struct Asm {
    base: u64,
    code: Vec<u8>,
}

impl Asm {
    fn new(base: u64) -> Asm {
        Asm { base, code: Vec::new() }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    fn here(&self) -> usize {
        self.code.len()
    }

    fn addr(&self, offset: usize) -> u64 {
        self.base + offset as u64
    }

    /// A conditional or unconditional jump back to `target`: rel8 when it reaches, else rel32.
    fn jump_back(&mut self, short_op: u8, near_op: &[u8], target: usize) {
        let rel8 = target as i64 - (self.here() as i64 + 2);
        if rel8 >= -128 {
            self.emit(&[short_op, rel8 as i8 as u8]);
        } else {
            let rel32 = target as i64 - (self.here() + near_op.len() + 4) as i64;
            self.emit(near_op);
            self.emit(&(rel32 as i32).to_le_bytes());
        }
    }

    /// `jnz target` (backwards).
    fn jnz(&mut self, target: usize) {
        self.jump_back(0x75, &[0x0f, 0x85], target);
    }

    /// `jmp target` (backwards).
    fn jmp(&mut self, target: usize) {
        self.jump_back(0xeb, &[0xe9], target);
    }

    /// `jb target` (backwards).
    fn jb(&mut self, target: usize) {
        self.jump_back(0x72, &[0x0f, 0x82], target);
    }

    /// `rdtsc; shl rdx, 32; or rax, rdx`: the whole 64-bit TSC in rax.
    fn rdtsc64(&mut self) {
        self.emit(&[0x0f, 0x31]); // rdtsc
        self.emit(&[0x48, 0xc1, 0xe2, 0x20]); // shl rdx, 32
        self.emit(&[0x48, 0x09, 0xd0]); // or rax, rdx
    }

    /// `call target` (backwards, rel32).
    fn call(&mut self, target: usize) {
        let rel32 = target as i64 - (self.here() + 5) as i64;
        self.emit(&[0xe8]);
        self.emit(&(rel32 as i32).to_le_bytes());
    }

    /// `mov r32, imm32` for eax..edi (register number 0..7), zero-extending into the 64-bit register.
    fn mov_imm32(&mut self, reg: u8, imm: u32) {
        self.emit(&[0xb8 + reg]);
        self.emit(&imm.to_le_bytes());
    }

    /// Emits `code` placed at a guest address that fits 32 bits (everything here sits below 4 GiB).
    fn abs32(addr: u64) -> [u8; 4] {
        debug_assert!(addr <= u64::from(u32::MAX));
        (addr as u32).to_le_bytes()
    }
}

// Register numbers for `mov_imm32`.
const EAX: u8 = 0;
const ECX: u8 = 1;
const EDX: u8 = 2;
const EBX: u8 = 3;
const ESI: u8 = 6;
const EDI: u8 = 7;

/// Emits the measurement routine for `kind` (see the module docs for the contract). For hlt-irq,
/// returns the offset of its hlt, which the interrupt handler needs.
fn routine(a: &mut Asm, kind: Kind, hypercall: Hypercall) -> Option<usize> {
    if kind == Kind::HltIrq {
        return Some(hlt_routine(a));
    }
    let top = a.here();
    a.emit(&[0x0f, 0xae, 0xe8]); // lfence: earlier instructions finish before the TSC is read
    a.emit(&[0x0f, 0x31]); // rdtsc
    a.emit(&[0x41, 0x89, 0xc0]); // mov r8d, eax                      t0
    match kind {
        Kind::Loop => {}
        Kind::Cpuid => {
            a.emit(&[0x31, 0xc0]); // xor eax, eax                    leaf 0
            a.emit(&[0x0f, 0xa2]); // cpuid
        }
        Kind::PioUser => a.emit(&[0xe6, PORT_USER]), // out PORT_USER, al
        Kind::PioIoeventfd => a.emit(&[0xe6, PORT_IOEVENTFD]), // out PORT_IOEVENTFD, al
        Kind::MmioUser | Kind::MmioIoeventfd => a.emit(&[0x89, 0x0b]), // mov [rbx], ecx
        Kind::Rdmsr => a.emit(&[0x0f, 0x32]), // rdmsr                    (ecx = MSR)
        Kind::Wrmsr => {
            a.emit(&[0x44, 0x89, 0xc8]); // mov eax, r9d                value, low half
            a.emit(&[0x44, 0x89, 0xd2]); // mov edx, r10d               value, high half
            a.emit(&[0x0f, 0x30]); // wrmsr                             (ecx = MSR)
        }
        Kind::HltIrq => {} // returned above
        Kind::Hypercall => {
            a.mov_imm32(EAX, KVM_HC_VAPIC_POLL_IRQ); // mov eax, KVM_HC_VAPIC_POLL_IRQ
            match hypercall {
                Hypercall::Vmcall => a.emit(&[0x0f, 0x01, 0xc1]), // vmcall
                Hypercall::Vmmcall => a.emit(&[0x0f, 0x01, 0xd9]), // vmmcall
            }
        }
    }
    a.emit(&[0x0f, 0xae, 0xe8]); // lfence: the op has finished
    a.emit(&[0x0f, 0x31]); // rdtsc                                   t1
    a.emit(&[0x44, 0x29, 0xc0]); // sub eax, r8d                      t1 - t0
    a.emit(&[0x89, 0x06]); // mov [rsi], eax
    a.emit(&[0x48, 0x83, 0xc6, 0x04]); // add rsi, 4
    a.emit(&[0x48, 0xff, 0xcf]); // dec rdi
    a.jnz(top); // jnz top
    a.emit(&[0xc3]); // ret
    None
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
/// Returns the offset of the hlt.
fn hlt_routine(a: &mut Asm) -> usize {
    a.emit(&[0xc7, 0x83]); // mov dword [rbx + APIC_LVTT], LVTT_TSC_DEADLINE   (once)
    a.emit(&APIC_LVTT.to_le_bytes());
    a.emit(&LVTT_TSC_DEADLINE.to_le_bytes());
    let top = a.here();
    a.emit(&[0x45, 0x31, 0xff]); // xor r15d, r15d                  no early wake yet
    a.emit(&[0x0f, 0xae, 0xe8]); // lfence
    a.rdtsc64(); //                                                   t0 in rax
    a.emit(&[0x4c, 0x01, 0xc8]); // add rax, r9                       deadline
    a.emit(&[0x49, 0x89, 0xc0]); // mov r8, rax
    a.emit(&[0x48, 0x89, 0xc2]); // mov rdx, rax
    a.emit(&[0x48, 0xc1, 0xea, 0x20]); // shr rdx, 32
    a.emit(&[0xfb]); // sti                                          its shadow covers the wrmsr
    a.emit(&[0x0f, 0x30]); // wrmsr                                   IA32_TSC_DEADLINE (ecx)
    let hlt = a.here();
    a.emit(&[0xf4]); // hlt                                          the handler returns below
    a.emit(&[0x0f, 0xae, 0xe8]); // lfence
    a.emit(&[0x0f, 0x31]); // rdtsc                                   t1
    a.emit(&[0x44, 0x29, 0xc0]); // sub eax, r8d                      t1 - deadline
    a.emit(&[0x45, 0x85, 0xff]); // test r15d, r15d                   woken before the hlt?
    a.emit(&[0x74, 0x05]); // jz store
    a.mov_imm32(EAX, EARLY_WAKE); // mov eax, EARLY_WAKE              (5 bytes)
    a.emit(&[0x89, 0x06]); // store: mov [rsi], eax
    a.emit(&[0xfa]); // cli
    a.emit(&[0xc7, 0x83]); // mov dword [rbx + APIC_EOI], 0
    a.emit(&APIC_EOI.to_le_bytes());
    a.emit(&0u32.to_le_bytes());
    a.emit(&[0x48, 0x83, 0xc6, 0x04]); // add rsi, 4
    a.emit(&[0x48, 0xff, 0xcf]); // dec rdi
    a.jnz(top); // jnz top
    a.emit(&[0xc3]); // ret
    hlt
}

/// The hlt-irq sample of an iteration whose interrupt came before its hlt (see [`hlt_routine`]).
pub const EARLY_WAKE: u32 = u32::MAX;

/// The IRQ_VECTOR handler: if the interrupted RIP is the hlt routine's hlt (at `hlt_addr`), the
/// interrupt came before the halt: skip the hlt and flag the iteration in r15. Then iretq; the
/// routine sends the EOI.
fn irq_handler(a: &mut Asm, hlt_addr: u64) {
    a.emit(&[0x50]); // push rax
    a.emit(&[0x48, 0x8b, 0x44, 0x24, 0x08]); // mov rax, [rsp + 8]   the interrupted RIP
    a.emit(&[0x48, 0x3d]); // cmp rax, hlt_addr
    a.emit(&Asm::abs32(hlt_addr));
    a.emit(&[0x75, 0x0b]); // jne out                                (skips the 11 bytes below)
    a.emit(&[0x48, 0xff, 0x44, 0x24, 0x08]); // inc qword [rsp + 8]   resume after the hlt
    a.emit(&[0x41, 0xbf, 1, 0, 0, 0]); // mov r15d, 1                 early wake
    a.emit(&[0x58]); // out: pop rax
    a.emit(&[0x48, 0xcf]); // iretq
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
    pub fn new(hypercall: Hypercall) -> Program {
        let mut a = Asm::new(CODE_START);
        let done = a.here();
        a.emit(&[0xe6, PORT_DONE]); // out PORT_DONE, al
        a.jmp(done); // jmp done: the runner never resumes after it, but must it, it sees done again
        let mut faults = [0; 32];
        for (vector, slot) in faults.iter_mut().enumerate() {
            *slot = a.here();
            a.emit(&[0xb0, vector as u8]); // mov al, vector
            a.emit(&[0xe6, PORT_FAULT]); // out PORT_FAULT, al
            a.jmp(*slot); // jmp back: the runner stops at the first report
        }
        let mut routines = Vec::new();
        let mut hlt = 0;
        for kind in Kind::ALL {
            routines.push((kind, a.here()));
            if let Some(at) = routine(&mut a, kind, hypercall) {
                hlt = at;
            }
        }
        let irq = a.here();
        let hlt_addr = a.addr(hlt);
        irq_handler(&mut a, hlt_addr);
        Program { code: a.code, done, faults, irq, routines }
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
const RESET_WAIT_CYCLES: u32 = 1 << 30;
/// An address outside both canonical halves: any access faults.
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;
/// First word of each line the image prints.
pub const IMAGE_TAG: &str = "nvmm-bench-raw";

/// Subroutines of the image: COM1 output.
struct Console {
    puts: usize,
    hex32: usize,
}

/// `puts` (rsi -> NUL-terminated) and `hex32` (r12d, printed as 8 hex digits and '\n'), over a
/// `putc` (al).
/// Each waits for the UART's transmit register to empty, so no VMM drops a character.
fn console(a: &mut Asm) -> Console {
    let putc = a.here();
    a.emit(&[0x41, 0x89, 0xc5]); // mov r13d, eax                    keep the character
    let wait = a.here();
    a.mov_imm32(EDX, u32::from(COM1_LSR)); // mov edx, COM1_LSR
    a.emit(&[0xec]); // in al, dx
    a.emit(&[0xa8, LSR_THRE]); // test al, LSR_THRE
    a.emit(&[0x74]); // jz wait
    let rel = wait as i64 - (a.here() as i64 + 1);
    a.emit(&[rel as i8 as u8]);
    a.emit(&[0x44, 0x89, 0xe8]); // mov eax, r13d
    a.mov_imm32(EDX, u32::from(COM1_DATA)); // mov edx, COM1_DATA
    a.emit(&[0xee]); // out dx, al
    a.emit(&[0xc3]); // ret

    let puts = a.here();
    let next = a.here();
    a.emit(&[0x8a, 0x06]); // mov al, [rsi]
    a.emit(&[0x84, 0xc0]); // test al, al
    a.emit(&[0x74, 0x0a]); // jz out (skips the 10 bytes below)
    a.call(putc); // call putc                                       (5 bytes)
    a.emit(&[0x48, 0xff, 0xc6]); // inc rsi                          (3 bytes)
    a.jmp(next); // jmp next                                         (2 bytes)
    a.emit(&[0xc3]); // out: ret

    let hex32 = a.here();
    a.emit(&[0x41, 0xbe, 8, 0, 0, 0]); // mov r14d, 8                  digits left
    let digit = a.here();
    a.emit(&[0x41, 0xc1, 0xc4, 0x04]); // rol r12d, 4                 next nibble to the bottom
    a.emit(&[0x44, 0x89, 0xe0]); // mov eax, r12d
    a.emit(&[0x83, 0xe0, 0x0f]); // and eax, 0xf
    a.emit(&[0x3c, 0x0a]); // cmp al, 10
    a.emit(&[0x72, 0x02]); // jb decimal
    a.emit(&[0x04, b'a' - b'0' - 10]); // add al, 'a' - '0' - 10
    a.emit(&[0x04, b'0']); // decimal: add al, '0'
    a.call(putc); // call putc
    a.emit(&[0x41, 0xff, 0xce]); // dec r14d
    a.jnz(digit); // jnz digit
    a.emit(&[0xb0, b'\n']); // mov al, '\n'
    a.call(putc); // call putc
    a.emit(&[0xc3]); // ret
    Console { puts, hex32 }
}

/// The bench as a standalone PVH ELF: entered in 32-bit protected mode, it maps the first GiB,
/// enters long mode, runs [`IMAGE_KINDS`] for `iterations` each at CPL 0 and prints, on COM1,
/// `nvmm-bench-raw <kind> <iterations>` and one hex cycle count per line for each, then
/// `nvmm-bench-raw end`. It then resets through the i8042 (nvmm) and, should that port be absent
/// (QEMU's microvm), triple-faults: either ends a VMM run with `-no-reboot`.
pub fn pvh_image(iterations: u32, hypercall: Hypercall) -> Vec<u8> {
    let mut a = Asm::new(CODE_START);
    let data = image_data(&mut a, iterations);
    let con = console(&mut a);
    let mut routines = Vec::new();
    for kind in IMAGE_KINDS {
        routines.push(a.here());
        routine(&mut a, kind, hypercall);
    }
    let entry = a.here();
    enter_long_mode(&mut a, data.gdtr);
    for (i, routine_at) in routines.iter().enumerate() {
        run_and_print(&mut a, *routine_at, data.headers[i], &con, iterations);
    }
    a.mov_imm32(ESI, a.addr(data.end_msg) as u32); // mov esi, end_msg
    a.call(con.puts); // call puts
    stop(&mut a, data.null_idtr);
    elf_with_pvh_note(&a.code, a.addr(entry))
}

/// Offsets of the image's data.
struct ImageData {
    /// lgdt operand: limit and 32-bit base of a three-entry GDT (null, ring-0 code, ring-0 data).
    gdtr: usize,
    /// lidt operand with limit 0: any exception then becomes a triple fault.
    null_idtr: usize,
    /// NUL-terminated header line of each IMAGE_KINDS block, and the closing line.
    headers: Vec<usize>,
    end_msg: usize,
}

/// Emits the data first, so that code refers to it backwards.
fn image_data(a: &mut Asm, iterations: u32) -> ImageData {
    let gdt_at = a.here();
    for e in &gdt()[..3] {
        a.emit(&e.to_le_bytes());
    }
    let gdtr = a.here();
    a.emit(&((3 * 8 - 1) as u16).to_le_bytes()); // limit
    a.emit(&(a.addr(gdt_at) as u32).to_le_bytes()); // base (lgdt in 32-bit mode reads 32 bits)
    a.emit(&[0; 2]);
    let null_idtr = a.here();
    a.emit(&[0; 10]);
    let mut headers = Vec::new();
    for kind in IMAGE_KINDS {
        headers.push(a.here());
        a.emit(format!("{IMAGE_TAG} {} {iterations}\n\0", kind.name()).as_bytes());
    }
    let end_msg = a.here();
    a.emit(format!("{IMAGE_TAG} end\n\0").as_bytes());
    ImageData { gdtr, null_idtr, headers, end_msg }
}

/// The PVH entry (32-bit protected mode, flat segments, paging off, no stack): identity-maps the
/// first GiB with 2 MiB pages, enables PAE, EFER.LME and paging, and far-jumps to the 64-bit code
/// that follows, which loads the data segments and the stack.
fn enter_long_mode(a: &mut Asm, gdtr: usize) {
    a.mov_imm32(EDI, IMAGE_PD as u32); // mov edi, IMAGE_PD
    a.mov_imm32(EAX, 0x83); // mov eax, 0x83                      2 MiB page, present, writable
    a.mov_imm32(ECX, 512); // mov ecx, 512                        entries: the first GiB
    let fill = a.here();
    a.emit(&[0x89, 0x07]); // mov [edi], eax
    a.emit(&[0xc7, 0x47, 0x04, 0, 0, 0, 0]); // mov dword [edi + 4], 0
    a.emit(&[0x05, 0x00, 0x00, 0x20, 0x00]); // add eax, 0x200000
    a.emit(&[0x83, 0xc7, 0x08]); // add edi, 8
    a.emit(&[0xe2]); // loop fill
    let rel = fill as i64 - (a.here() as i64 + 1);
    a.emit(&[rel as i8 as u8]);
    a.emit(&[0xc7, 0x05]); // mov dword [IMAGE_PDPT], IMAGE_PD | 3
    a.emit(&Asm::abs32(IMAGE_PDPT));
    a.emit(&((IMAGE_PD | 3) as u32).to_le_bytes());
    a.emit(&[0xc7, 0x05]); // mov dword [IMAGE_PML4], IMAGE_PDPT | 3
    a.emit(&Asm::abs32(IMAGE_PML4));
    a.emit(&((IMAGE_PDPT | 3) as u32).to_le_bytes());
    a.mov_imm32(EAX, IMAGE_PML4 as u32); // mov eax, IMAGE_PML4
    a.emit(&[0x0f, 0x22, 0xd8]); // mov cr3, eax
    a.emit(&[0x0f, 0x20, 0xe0]); // mov eax, cr4
    a.emit(&[0x83, 0xc8, 0x20]); // or eax, CR4.PAE
    a.emit(&[0x0f, 0x22, 0xe0]); // mov cr4, eax
    a.mov_imm32(ECX, 0xc000_0080); // mov ecx, IA32_EFER
    a.emit(&[0x0f, 0x32]); // rdmsr
    a.emit(&[0x0d, 0x00, 0x01, 0x00, 0x00]); // or eax, EFER.LME
    a.emit(&[0x0f, 0x30]); // wrmsr
    a.emit(&[0x0f, 0x20, 0xc0]); // mov eax, cr0
    a.emit(&[0x0d, 0x01, 0x00, 0x00, 0x80]); // or eax, CR0.PG | CR0.PE
    a.emit(&[0x0f, 0x22, 0xc0]); // mov cr0, eax                    long mode, still 32-bit code
    a.emit(&[0x0f, 0x01, 0x15]); // lgdt [gdtr]
    a.emit(&Asm::abs32(a.addr(gdtr)));
    let far_jump = a.here();
    a.emit(&[0xea, 0, 0, 0, 0]); // jmp far SEL_CODE0:long64          (offset patched below)
    a.emit(&SEL_CODE0.to_le_bytes());

    // 64-bit code from here.
    let long64_addr = Asm::abs32(a.addr(a.here()));
    a.code[far_jump + 1..far_jump + 5].copy_from_slice(&long64_addr);
    a.mov_imm32(EAX, u32::from(SEL_DATA0)); // mov eax, SEL_DATA0
    a.emit(&[0x8e, 0xd8]); // mov ds, eax
    a.emit(&[0x8e, 0xc0]); // mov es, eax
    a.emit(&[0x8e, 0xd0]); // mov ss, eax
    a.mov_imm32(4, STACK0_TOP as u32); // mov esp, STACK0_TOP
}

/// Runs one routine, then prints its header line and its samples.
fn run_and_print(a: &mut Asm, routine_at: usize, header: usize, con: &Console, iterations: u32) {
    a.mov_imm32(EDI, iterations); // mov edi, iterations
    a.mov_imm32(ESI, RESULTS_START as u32); // mov esi, RESULTS_START
    a.call(routine_at); // call the routine
    a.mov_imm32(ESI, a.addr(header) as u32); // mov esi, header
    a.call(con.puts); // call puts
    a.mov_imm32(EBX, RESULTS_START as u32); // mov ebx, RESULTS_START
    a.emit(&[0x41, 0xbf]); // mov r15d, iterations
    a.emit(&iterations.to_le_bytes());
    let dump = a.here();
    a.emit(&[0x44, 0x8b, 0x23]); // mov r12d, [rbx]
    a.call(con.hex32); // call hex32
    a.emit(&[0x48, 0x83, 0xc3, 0x04]); // add rbx, 4
    a.emit(&[0x41, 0xff, 0xcf]); // dec r15d
    a.jnz(dump); // jnz dump
}

/// Ends the run: i8042 reset (nvmm), then after RESET_WAIT_CYCLES a triple fault (QEMU's microvm
/// has no i8042).
fn stop(a: &mut Asm, null_idtr: usize) {
    a.emit(&[0xb0, 0xfe]); // mov al, 0xfe                          i8042: pulse reset
    a.emit(&[0xe6, 0x64]); // out 0x64, al
    // Wait RESET_WAIT_CYCLES for a VMM's reset to take effect: the vCPU runs on while the VMM's main
    // loop handles it, and must not fault before (a fault can be reported first).
    a.rdtsc64();
    a.emit(&[0x49, 0x89, 0xc0]); // mov r8, rax                      start
    let wait = a.here();
    a.emit(&[0xf3, 0x90]); // pause
    a.rdtsc64();
    a.emit(&[0x4c, 0x29, 0xc0]); // sub rax, r8                      elapsed
    a.emit(&[0x48, 0x3d]); // cmp rax, RESET_WAIT_CYCLES
    a.emit(&RESET_WAIT_CYCLES.to_le_bytes());
    a.jb(wait); // jb wait
    a.emit(&[0x0f, 0x01, 0x1c, 0x25]); // lidt [null_idtr]
    a.emit(&Asm::abs32(a.addr(null_idtr)));
    // A load from a non-canonical address: #GP, which with no IDT becomes a triple fault. (Not
    // int3: KVM's instruction emulator, which runs CPL 0 on PVM, cannot execute it.)
    a.emit(&[0xa0]); // mov al, [NON_CANONICAL]                    movabs, 64-bit address
    a.emit(&NON_CANONICAL.to_le_bytes());
    a.emit(&[0xf4]); // hlt                                         not reached
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
        let mut a = Asm::new(CODE_START);
        routine(&mut a, Kind::Loop, Hypercall::Vmmcall);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x0f, 0xae, 0xe8, 0x0f, 0x31, 0x41, 0x89, 0xc0,       // lfence; rdtsc; mov r8d, eax
            0x0f, 0xae, 0xe8, 0x0f, 0x31, 0x44, 0x29, 0xc0,       // lfence; rdtsc; sub eax, r8d
            0x89, 0x06, 0x48, 0x83, 0xc6, 0x04, 0x48, 0xff, 0xcf, // mov [rsi], eax; add rsi, 4; dec rdi
            0x75, 0xe5,                                           // jnz top (-27)
            0xc3,                                                 // ret
        ];
        assert_eq!(a.code, expected);
    }

    #[test]
    fn each_kind_has_its_exiting_instruction_between_the_timestamps() {
        let p = Program::new(Hypercall::Vmmcall);
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
        let intel = Program::new(Hypercall::Vmcall);
        assert!(find(&intel.code[intel.routine(Kind::Hypercall)..], &[0x0f, 0x01, 0xc1]).is_some());
    }

    #[test]
    fn hlt_routine_arms_the_deadline_halts_and_eois_after_t1() {
        let p = Program::new(Hypercall::Vmmcall);
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
        let h = &p.code[p.irq..];
        assert_eq!(&h[..8], &[0x50, 0x48, 0x8b, 0x44, 0x24, 0x08, 0x48, 0x3d]);
        assert_eq!(u32::from_le_bytes(h[8..12].try_into().unwrap()) as u64, hlt_addr);
        assert_eq!(&h[12..], &[0x75, 0x0b, 0x48, 0xff, 0x44, 0x24, 0x08, 0x41, 0xbf, 1, 0, 0, 0, 0x58, 0x48, 0xcf]);
        let eoi = find(code, &[0xc7, 0x83, 0xb0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(eoi > t1);
        let inputs = Inputs::for_kind(Kind::HltIrq, 0, 5000);
        assert_eq!((inputs.rbx, inputs.rcx, inputs.r9), (APIC_START, 0x6e0, 5000));
    }

    #[test]
    fn routines_return_and_stubs_report() {
        let p = Program::new(Hypercall::Vmmcall);
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
        let p = Program::new(Hypercall::Vmmcall);
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
        let img = pvh_image(1000, Hypercall::Vmmcall);
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
