//! Vendor code never reaches the cloud's instance metadata service.
//!
//! On a cloud host, the metadata service (169.254.169.254; AWS's also at `fd00:ec2::254`, ECS
//! task metadata at 169.254.170.2, ...) hands the instance's role credentials to anyone on the
//! host who asks: boxed code that could reach it would act with the customer's cloud identity
//! (read the customer's secrets, which the appliance itself only ever describes).
//! So one cgroup BPF program per connect and UDP sendmsg hook, attached to the directory all
//! cells live under ([`super::cell::Cells`]), refuses (`EPERM`) every destination in
//! [`FENCED_V4`] and [`FENCED_V6`] (and the IPv4 ones written IPv4-mapped on an IPv6 socket) to
//! every process in every cell, and to nothing outside them: the appliance itself is not held.
//! A cell cannot undo it: its programs are attached with `BPF_F_ALLOW_MULTI`, which a
//! descendant cannot override, and vendor code has no `CAP_BPF` or `CAP_SYS_ADMIN` to detach them.
//!
//! The programs are a few dozen instructions, written here as raw `bpf_insn`s and loaded with
//! the `bpf(2)` system call: building them from C or Rust needs a BPF toolchain (clang, or aya
//! with bpf-linker), which neither CI nor a customer's build has, and no maintained pure-Rust
//! crate emits cgroup programs without one (rbpf is a VM with an assembler; bpf-ins, a bare
//! instruction encoder, has not changed since early 2024). A small encoder is easier to review.
//! The layouts and numbers below are those of the kernel's `include/uapi/linux/bpf.h`.
//!
//! A restart does not stack a second copy: what is attached to the directory already is
//! detached once the new program is in place (so leftovers that still run are never unfenced).
//! Where loading or attaching fails (no `CAP_BPF`, an old kernel), the appliance says so when it
//! starts and in `phase status`, and runs on: many hosts have no metadata service.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::libc;

#[cfg(test)]
mod tests;

/// IPv4 destinations no cell may reach, with their prefix lengths.
const FENCED_V4: [(Ipv4Addr, u8); 2] = [
    // Link-local: the metadata service of AWS, Azure, GCP, Oracle and OpenStack
    // (169.254.169.254), ECS task metadata (169.254.170.2), EKS Pod Identity (169.254.170.23).
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    // Alibaba Cloud's metadata service.
    (Ipv4Addr::new(100, 100, 100, 200), 32),
];

/// IPv6 destinations no cell may reach (besides the IPv4 ones, IPv4-mapped).
const FENCED_V6: [(Ipv6Addr, u8); 4] = [
    // AWS's instance metadata service.
    (Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), 128),
    // AWS's EKS Pod Identity agent.
    (Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23), 128),
    // GCP's metadata service, for IPv6-only instances.
    (Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254), 128),
    // OpenStack's metadata service on IPv6 (169.254.169.254's link-local twin).
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xa9fe, 0xa9fe), 128),
];

// `enum bpf_cmd`.
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_ATTACH: u32 = 8;
const BPF_PROG_DETACH: u32 = 9;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_PROG_QUERY: u32 = 16;
// `enum bpf_prog_type`.
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
// `enum bpf_attach_type`.
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

/// The hooks fenced: every TCP connect, and every UDP datagram, connected or sent to an address.
const HOOKS: [Hook; 4] = [
    Hook { attach_type: BPF_CGROUP_INET4_CONNECT, family: Family::V4 },
    Hook { attach_type: BPF_CGROUP_INET6_CONNECT, family: Family::V6 },
    Hook { attach_type: BPF_CGROUP_UDP4_SENDMSG, family: Family::V4 },
    Hook { attach_type: BPF_CGROUP_UDP6_SENDMSG, family: Family::V6 },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug)]
struct Hook {
    attach_type: u32,
    family: Family,
}

/// Attaches the fence to the cells directory `cells_dir` (replacing what a previous process
/// attached there); `Err` says why vendor code can reach the metadata service.
pub(super) fn fence(cells_dir: &Path) -> Result<(), String> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(cells_dir)
        .map_err(|e| format!("cannot open {}: {e}", cells_dir.display()))?;
    let dir = dir.as_raw_fd();
    for hook in HOOKS {
        let before = attached(dir, hook.attach_type).map_err(|e| format!("cannot list the programs attached: {e}"))?;
        let program = load(hook)?;
        let attach = ProgAttach {
            target_fd: fd_u32(dir),
            attach_bpf_fd: fd_u32(program.as_raw_fd()),
            attach_type: hook.attach_type,
            attach_flags: BPF_F_ALLOW_MULTI,
            replace_bpf_fd: 0,
            _tail: 0,
        };
        bpf(BPF_PROG_ATTACH, attach).map_err(|e| format!("cannot attach the metadata fence: {e}"))?;
        // The new copy holds now; the previous process's go.
        for id in before {
            if let Err(e) = detach(dir, hook.attach_type, id) {
                tracing::warn!(program = id, error = %e, "cannot detach a previous metadata fence");
            }
        }
    }
    Ok(())
}

/// The ids of the programs attached to cgroup `dir` itself at `attach_type`.
fn attached(dir: i32, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut query = Padded::new(ProgQuery {
        target_fd: fd_u32(dir),
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: u32::try_from(ids.len()).unwrap_or(u32::MAX),
        _hole: 0,
    });
    bpf_raw(BPF_PROG_QUERY, &mut query)?;
    ids.truncate(usize::try_from(query.attr.prog_cnt).unwrap_or(0));
    Ok(ids)
}

fn detach(dir: i32, attach_type: u32, id: u32) -> io::Result<()> {
    let program =
        owned(bpf(BPF_PROG_GET_FD_BY_ID, ProgGetFdById { prog_id: id, next_id: 0, open_flags: 0, _tail: 0 })?)?;
    let detach = ProgAttach {
        target_fd: fd_u32(dir),
        attach_bpf_fd: fd_u32(program.as_raw_fd()),
        attach_type,
        attach_flags: 0,
        replace_bpf_fd: 0,
        _tail: 0,
    };
    bpf(BPF_PROG_DETACH, detach).map(drop)
}

/// Loads the fence for `hook`.
fn load(hook: Hook) -> Result<OwnedFd, String> {
    load_program(&program(hook.family), hook)
}

/// Loads `instructions` for `hook`; on failure, the verifier's last words are in the error.
fn load_program(instructions: &[Insn], hook: Hook) -> Result<OwnedFd, String> {
    let license = c"Apache-2.0";
    // As `bpftool prog` lists it: 15 characters at most, NUL-padded.
    let name = match hook.family {
        Family::V4 => *b"airlock_fence4\0\0",
        Family::V6 => *b"airlock_fence6\0\0",
    };
    let load = |log: &mut [u8]| {
        let attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: u32::try_from(instructions.len()).unwrap_or(u32::MAX),
            insns: instructions.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: u32::try_from(log.len()).unwrap_or(0),
            // No buffer at all without a log: the kernel refuses one with level 0.
            log_buf: if log.is_empty() { 0 } else { log.as_mut_ptr() as u64 },
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: hook.attach_type,
        };
        bpf(BPF_PROG_LOAD, attr).and_then(owned)
    };
    load(&mut []).or_else(|e| {
        // Again, with the verifier's log (which a success would also have written, at a cost).
        let mut log = vec![0u8; 1 << 16];
        match load(&mut log) {
            Ok(fd) => Ok(fd),
            Err(_) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let log = String::from_utf8_lossy(&log[..end]);
                let lines: Vec<&str> = log.trim_end().lines().collect();
                match lines[lines.len().saturating_sub(8)..].join(" | ") {
                    tail if tail.is_empty() => Err(format!("cannot load the metadata fence: {e}")),
                    tail => Err(format!("cannot load the metadata fence: {e}; the verifier says: {tail}")),
                }
            }
        }
    })
}

/// One `struct bpf_insn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
struct Insn {
    code: u8,
    /// `dst_reg:4, src_reg:4`, bitfields in the C struct: dst in the low nibble on a
    /// little-endian machine, the high one on a big-endian one.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes: class | operation | source, from `bpf_common.h` and `bpf.h`.
const LDX_MEM_W: u8 = 0x01 | 0x60; // BPF_LDX | BPF_MEM | BPF_W
const ALU32_MOV_X: u8 = 0x04 | 0xb0 | 0x08; // BPF_ALU | BPF_MOV | BPF_X
const ALU32_AND_K: u8 = 0x04 | 0x50; // BPF_ALU | BPF_AND | BPF_K
const ALU64_MOV_K: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
const JMP32_JNE_K: u8 = 0x06 | 0x50; // BPF_JMP32 | BPF_JNE | BPF_K
const JMP_JA: u8 = 0x05; // BPF_JMP | BPF_JA
const JMP_EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT

/// `struct bpf_sock_addr`: `user_ip4` at 4, `user_ip6[4]` at 8, in network byte order.
const USER_IP4: i16 = 4;
const USER_IP6: i16 = 8;

impl Insn {
    fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        let regs = if cfg!(target_endian = "little") { dst | src << 4 } else { dst << 4 | src };
        Self { code, regs, off, imm }
    }
}

/// The program for one address family: the context (`r1`) holds the destination; `r0` = 1
/// lets the connect or send go on, 0 refuses it with `EPERM`.
///
/// The destination's 32-bit words are loaded into r2 (to r5, for IPv6) as they lie in memory
/// (network byte order), so each fenced prefix is compared word by word against its own bytes
/// read the same way (`u32::from_ne_bytes`), on any host. A word the prefix covers in part is
/// masked in r6 first. A prefix that matches jumps to the refusal; one that does not, to the next.
fn program(family: Family) -> Vec<Insn> {
    let (words, fenced): (usize, Vec<([u8; 16], u32)>) = match family {
        Family::V4 => (1, FENCED_V4.iter().map(|(a, len)| (widen(a.octets()), u32::from(*len))).collect()),
        Family::V6 => (
            4,
            FENCED_V6
                .iter()
                .map(|(a, len)| (a.octets(), u32::from(*len)))
                .chain(FENCED_V4.iter().map(|(a, len)| (a.to_ipv6_mapped().octets(), 96 + u32::from(*len))))
                .collect(),
        ),
    };
    let base = if family == Family::V4 { USER_IP4 } else { USER_IP6 };
    let mut code = Vec::new();
    for (word, register) in (0..words).zip(2u8..) {
        let offset = base + i16::try_from(4 * word).unwrap_or(0);
        code.push(Insn::new(LDX_MEM_W, register, 1, offset, 0));
    }
    // Where each prefix's "go to the refusal" jump is, to be aimed once the refusal's place is known.
    let mut to_refusal = Vec::new();
    for (octets, prefix) in fenced {
        let mut entry = Vec::new();
        for (word, register) in (0..words).zip(2u8..) {
            let covered = prefix.saturating_sub(32 * u32::try_from(word).unwrap_or(0)).min(32);
            if covered == 0 {
                continue;
            }
            let mask = (u32::MAX << (32 - covered)).to_be_bytes();
            let bytes: [u8; 4] = std::array::from_fn(|i| octets[4 * word + i] & mask[i]);
            let compared = if covered < 32 {
                entry.push(Insn::new(ALU32_MOV_X, 6, register, 0, 0));
                entry.push(Insn::new(ALU32_AND_K, 6, 0, 0, i32::from_ne_bytes(mask)));
                6
            } else {
                register
            };
            entry.push(Insn::new(JMP32_JNE_K, compared, 0, 0, i32::from_ne_bytes(bytes)));
        }
        entry.push(Insn::new(JMP_JA, 0, 0, 0, 0));
        // A mismatch skips to the next prefix, just past this one's final jump.
        let len = entry.len();
        for (i, insn) in entry.iter_mut().enumerate() {
            if insn.code == JMP32_JNE_K {
                insn.off = i16::try_from(len - i - 1).unwrap_or(i16::MAX);
            }
        }
        to_refusal.push(code.len() + len - 1);
        code.extend(entry);
    }
    code.push(Insn::new(ALU64_MOV_K, 0, 0, 0, 1));
    code.push(Insn::new(JMP_EXIT, 0, 0, 0, 0));
    let refusal = code.len();
    for at in to_refusal {
        code[at].off = i16::try_from(refusal - at - 1).unwrap_or(i16::MAX);
    }
    code.push(Insn::new(ALU64_MOV_K, 0, 0, 0, 0));
    code.push(Insn::new(JMP_EXIT, 0, 0, 0, 0));
    code
}

/// An IPv4 address's octets, first, in a 16-byte array.
fn widen(v4: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&v4);
    out
}

// `union bpf_attr`, one member per command used; the kernel zeroes what is past them.
// None has a padding byte (whose value Rust leaves undefined, where the kernel refuses any
// but zero): each field is aligned where it lies, and the holes and tails are named fields.

#[repr(C)]
#[derive(Clone, Copy)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _tail: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    /// Where the C struct aligns the next `__aligned_u64`.
    _hole: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ProgGetFdById {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
    _tail: u32,
}

/// An attribute with zeroes after it as far as any kernel's `union bpf_attr` reaches: a kernel
/// writes some answers (a query's revision, say) past the fields this module names.
#[repr(C)]
struct Padded<T> {
    attr: T,
    zeroes: [u64; 32],
}

impl<T> Padded<T> {
    fn new(attr: T) -> Self {
        // No padding between the attribute and the zeroes either.
        const { assert!(size_of::<T>().is_multiple_of(align_of::<u64>())) };
        Self { attr, zeroes: [0; 32] }
    }
}

fn bpf<T>(cmd: u32, attr: T) -> io::Result<i64> {
    bpf_raw(cmd, &mut Padded::new(attr))
}

fn bpf_raw<T>(cmd: u32, attr: &mut Padded<T>) -> io::Result<i64> {
    let size = libc::c_uint::try_from(size_of::<Padded<T>>()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: `attr` is a `repr(C)` prefix of `union bpf_attr` followed by enough zeroes for
    // the whole union, valid for reads and writes for `size` bytes while the kernel runs the
    // command; every pointer inside it (instructions, license, log, id buffer) points to memory
    // the caller keeps alive and sized as the attribute says.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(libc::SYS_bpf, libc::c_long::from(cmd), std::ptr::from_mut(attr), size) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// The descriptor a `bpf` command returned, owned.
fn owned(fd: i64) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("a descriptor out of range"))?;
    // SAFETY: the kernel just returned `fd`, a new descriptor that nothing else owns.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_u32(fd: i32) -> u32 {
    u32::try_from(fd).unwrap_or(u32::MAX)
}
