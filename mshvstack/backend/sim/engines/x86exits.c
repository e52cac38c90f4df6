/*
 * What the hypervisor writes at an intercept, written by the engine's core
 * itself for the exits that need nothing from Python: the VP's register
 * page after every stop, the IO port intercept message, and the register
 * page the VMM wrote back before the next run.  The Python encoder
 * (intercepts.py) writes every other message, from the same fields.
 *
 * Compiled after x86core.c, in the same unit; the layouts come from the
 * project's hypervisor headers (include/hyperv), the same ones the Python
 * binding is generated from.
 */
#include "hyperv/hyperv.h"

#define CR0_PE (1ull << 0)
#define CR0_AM (1ull << 18)

_Static_assert(sizeof(struct hv_message) == HV_MESSAGE_SIZE, "hv_message is one SynIC slot");

/* QEMU keeps descriptor bits 8-23; hv_x64_segment_register packs them in 16 bits. */
static void hv_segment(struct hv_x64_segment_register *out, const struct qemu_segment *s)
{
    out->base = s->base;
    out->limit = s->limit;
    out->selector = (uint16_t)s->selector;
    out->attributes = (uint16_t)(((s->flags >> 8) & 0xFF) | ((s->flags >> 8) & 0xF000));
}

static void fill_header(struct mshvstack_cpu *c, struct hv_x64_intercept_message_header *h, unsigned length,
                        unsigned access)
{
    struct qemu_x86_head *env = c->env;
    uint64_t cr0 = mshvstack_read_register(c, c->reg_cr0);
    struct hv_x64_segment_register ss;
    hv_segment(&ss, &env->segs[2]);
    h->vp_index = c->vp_index;
    h->instruction_length = length & 0xF;
    h->cr8 = mshvstack_read_register(c, c->reg_cr8) & 0xF;
    h->intercept_access_type = (uint8_t)access;
    h->execution_state.bits.cpl = (cr0 & CR0_PE) ? (ss.attributes >> 5) & 3 : 0;
    h->execution_state.bits.cr0_pe = cr0 & CR0_PE ? 1 : 0;
    h->execution_state.bits.cr0_am = cr0 & CR0_AM ? 1 : 0;
    h->execution_state.bits.efer_lma = env->efer & EFER_LMA ? 1 : 0;
    hv_segment(&h->cs_segment, &env->segs[1]);
    h->rip = env->eip;
    h->rflags = mshvstack_read_register(c, c->reg_rflags);
}

static bool is_prefix(uint8_t byte)
{
    switch (byte) {
    case 0x66: case 0xF2: case 0xF3: case 0x67: case 0x2E: case 0x36: case 0x3E: case 0x26: case 0x64: case 0x65:
        return true;
    default:
        return false;
    }
}

/* HVMSG_X64_IO_PORT_INTERCEPT for the instruction the engine stopped at. */
static void write_io_intercept(struct mshvstack_cpu *c)
{
    struct qemu_x86_head *env = c->env;
    const struct special_entry *insn = &c->stopped_at;
    struct hv_message *msg = c->message_page;
    struct hv_x64_io_port_intercept_message *io = (void *)&msg->u;
    int bits = env->hflags & HF_CS64 ? 64 : env->hflags & HF_CS32 ? 32 : 16;
    unsigned at = 0;
    bool rep = false, size_override = false;
    while (at + 1 < insn->length && is_prefix(insn->raw[at])) {
        rep |= insn->raw[at] == 0xF2 || insn->raw[at] == 0xF3;
        size_override |= insn->raw[at] == 0x66;
        at++;
    }
    if (bits == 64 && at + 1 < insn->length && (insn->raw[at] & 0xF0) == 0x40)
        at++;   /* REX */
    uint8_t opcode = insn->raw[at];
    bool string = opcode >= 0x6C && opcode <= 0x6F;
    bool out = opcode == 0xE6 || opcode == 0xE7 || opcode == 0xEE || opcode == 0xEF || opcode == 0x6E || opcode == 0x6F;
    bool byte = opcode == 0xE4 || opcode == 0xE6 || opcode == 0xEC || opcode == 0xEE || opcode == 0x6C || opcode == 0x6E;
    bool immediate = opcode >= 0xE4 && opcode <= 0xE7;
    memset(msg, 0, sizeof *msg);
    msg->header.message_type = HVMSG_X64_IO_PORT_INTERCEPT;
    msg->header.payload_size = sizeof *io;
    fill_header(c, &io->header, insn->length, out ? HV_INTERCEPT_ACCESS_WRITE : HV_INTERCEPT_ACCESS_READ);
    io->port_number = immediate ? insn->raw[at + 1] : (uint16_t)env->regs[2];
    io->access_info.bits.access_size = byte ? 1 : ((bits == 16) != size_override ? 2 : 4);
    io->access_info.bits.string_op = string;
    io->access_info.bits.rep_prefix = rep && string;
    io->instruction_byte_count = insn->length;
    memcpy(io->instruction_bytes, insn->raw, insn->length);
    io->rax = env->regs[0];
    io->rcx = env->regs[1];
    io->rsi = env->regs[6];
    io->rdi = env->regs[7];
    hv_segment(&io->ds_segment, &env->segs[3]);
    hv_segment(&io->es_segment, &env->segs[0]);
}

/*
 * A hypercall the VMM answers (a VMBus doorbell or message), where the core
 * writes the intercept itself: the partition intercepts hypercalls, the
 * VP's pages are attached, and a 64-bit caller asks for HvPostMessage or
 * HvSignalEvent (RCX's call code).  Everything else (32-bit callers, other
 * codes, the hypervisor's own answers) goes to the Python half, which
 * decides the same way.
 */
static int intercepted_hypercall(const struct mshvstack_cpu *c)
{
    if (!c->intercept_hypercalls || !c->message_page || !(c->env->hflags & HF_CS64))
        return 0;
    uint16_t code = (uint16_t)c->env->regs[1];   /* RCX: the control word's call code */
    return code == HVCALL_POST_MESSAGE || code == HVCALL_SIGNAL_EVENT;
}

void mshvstack_intercept_hypercalls(struct mshvstack_cpu *c, int on)
{
    c->intercept_hypercalls = on;
}

/* HVMSG_HYPERCALL_INTERCEPT for the hypercall the engine stopped at (intercepts.py's fields). */
static void write_hypercall_intercept(struct mshvstack_cpu *c)
{
    const uint64_t *regs = c->env->regs;   /* QEMU's order: RAX RCX RDX RBX RSP RBP RSI RDI R8... */
    struct hv_message *msg = c->message_page;
    struct hv_x64_hypercall_intercept_message *call = (void *)&msg->u;
    memset(msg, 0, sizeof *msg);
    msg->header.message_type = HVMSG_HYPERCALL_INTERCEPT;
    msg->header.payload_size = sizeof *call;
    struct hv_x64_intercept_message_header header;   /* (the message is packed: filled aside, copied in) */
    memset(&header, 0, sizeof header);
    fill_header(c, &header, c->stopped_at.length, HV_INTERCEPT_ACCESS_EXECUTE);
    memcpy(&call->header, &header, sizeof header);
    call->rax = regs[0];
    call->rbx = regs[3];
    call->rcx = regs[1];
    call->rdx = regs[2];
    call->r8 = regs[8];
    call->rsi = regs[6];
    call->rdi = regs[7];
}

/* Refresh the VP's register page from the CPU, as the hypervisor does at every intercept. */
void mshvstack_publish_registers(struct mshvstack_cpu *c)
{
    struct qemu_x86_head *env = c->env;
    struct hv_vp_register_page *page = c->register_page;
    if (!page)
        return;
    memcpy(page->gp_registers, env->regs, sizeof page->gp_registers);
    page->rip = env->eip;
    page->rflags = mshvstack_read_register(c, c->reg_rflags);
    for (int i = 0; i < 6; i++)
        hv_segment(&page->segment_registers[i], &env->segs[i]);
    page->cr0 = mshvstack_read_register(c, c->reg_cr0);
    page->cr3 = mshvstack_read_register(c, c->reg_cr3);
    page->cr4 = mshvstack_read_register(c, c->reg_cr4);
    page->cr8 = mshvstack_read_register(c, c->reg_cr8);
    page->efer = env->efer;
    page->dr7 = mshvstack_read_register(c, c->reg_dr7);
    page->version = HV_VP_REGISTER_PAGE_VERSION_1;
    page->dirty = 0;
    page->isvalid = 1;
}

/*
 * Apply what the VMM wrote through the register page: the general
 * registers, RIP and RFLAGS here (RIP as a completed emulation: a
 * STI/MOV SS shadow ends).  Returns the dirty classes left for the caller
 * (segments: they go through the VP's own setter); the page's dirty mask
 * is cleared when nothing is left.
 */
uint32_t mshvstack_consume_registers(struct mshvstack_cpu *c)
{
    struct hv_vp_register_page *page = c->register_page;
    if (!page || !page->isvalid || !page->dirty)
        return 0;
    uint32_t dirty = page->dirty;
    if (dirty & (1u << HV_X64_REGISTER_CLASS_GENERAL))
        memcpy(c->env->regs, page->gp_registers, sizeof page->gp_registers);
    if (dirty & (1u << HV_X64_REGISTER_CLASS_IP)) {
        c->env->eip = page->rip;
        c->env->hflags &= ~HF_INHIBIT_IRQ;
    }
    if (dirty & (1u << HV_X64_REGISTER_CLASS_FLAGS)) {
        uint64_t rflags = page->rflags;
        c->api.reg_write(c->uc, c->reg_rflags, &rflags);
    }
    uint32_t left = dirty & (1u << HV_X64_REGISTER_CLASS_SEGMENT);
    if (!left)
        page->dirty = 0;
    return left;
}

/* Where the core writes the VP's register page and the intercepts it encodes (NULL: none). */
void mshvstack_attach_vp(struct mshvstack_cpu *c, uint32_t vp_index, void *register_page, void *message_page,
                         const int register_ids[6])
{
    c->vp_index = vp_index;
    c->register_page = register_page;
    c->message_page = message_page;
    c->reg_rflags = register_ids[0];
    c->reg_cr0 = register_ids[1];
    c->reg_cr3 = register_ids[2];
    c->reg_cr4 = register_ids[3];
    c->reg_cr8 = register_ids[4];
    c->reg_dr7 = register_ids[5];
}

/*
 * Run the engine from the CPU's RIP until it stops: one call from Python
 * per run.  Nothing runs when a stop was asked for (REASON_CANCELLED) or
 * when a translated code page changed since its translation
 * (RUN_CODE_CHANGED, its index in changed_page: the caller drops it and
 * runs again).  A stop at an IO instruction or an intercepted hypercall
 * leaves its intercept message in the VP's message page and the register
 * page published.  Otherwise returns Unicorn's status.
 */
int mshvstack_run(struct mshvstack_cpu *c, int64_t deadline_ns)
{
    c->reason = REASON_NONE;
    if (c->stop_request) {
        c->stop_request = 0;
        c->reason = REASON_CANCELLED;
        return 0;
    }
    int changed = mshvstack_first_changed_page(c->code_hosts, c->code_saved, c->code_pages, 0x1000);
    if (changed >= 0) {
        c->changed_page = changed;
        return RUN_CODE_CHANGED;
    }
    int64_t started = now_ns();
    mshvstack_enter(c, deadline_ns);
    int status = c->api.emu_start(c->uc, c->env->eip, 0, 0, 0);
    mshvstack_leave(c);
    c->running_ns += now_ns() - started;
    c->stop_request = 0;
    if (c->reason == REASON_IO || c->reason == REASON_HYPERCALL) {
        if (c->reason == REASON_IO)
            write_io_intercept(c);
        else
            write_hypercall_intercept(c);
        mshvstack_publish_registers(c);
    }
    return status;
}
