//! The fence's programs, run here by a small interpreter of the instructions they use, and
//! the fence as the kernel holds it around real boxes (these need root, as CI is: they fail,
//! never skip, where it cannot be attached).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use airlock_core::OperationId;

use super::super::{RunLimits, Sandbox};
use super::*;

/// What the program does for a connect or send to `destination`: 1 lets it go on, 0 refuses it.
fn verdict(program: &[Insn], destination: IpAddr) -> u64 {
    // `struct bpf_sock_addr`, as far as the programs read it.
    let mut context = [0u8; 28];
    match destination {
        IpAddr::V4(a) => context[4..8].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => context[8..24].copy_from_slice(&a.octets()),
    }
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    for _ in 0..program.len() {
        let insn = program[pc];
        pc += 1;
        let (dst, src) = if cfg!(target_endian = "little") {
            (usize::from(insn.regs & 0xf), usize::from(insn.regs >> 4))
        } else {
            (usize::from(insn.regs >> 4), usize::from(insn.regs & 0xf))
        };
        let imm32 = u32::from_ne_bytes(insn.imm.to_ne_bytes());
        let forward = usize::try_from(insn.off).expect("the programs only jump forward");
        match insn.code {
            LDX_MEM_W => {
                assert_eq!(src, 1, "loads are from the context");
                let at = usize::try_from(insn.off).unwrap();
                r[dst] = u64::from(u32::from_ne_bytes(context[at..at + 4].try_into().unwrap()));
            }
            ALU32_MOV_X => r[dst] = r[src] & u64::from(u32::MAX),
            ALU32_AND_K => r[dst] &= u64::from(imm32),
            ALU64_MOV_K => r[dst] = u64::from_ne_bytes(i64::from(insn.imm).to_ne_bytes()),
            JMP32_JNE_K if (r[dst] & u64::from(u32::MAX)) != u64::from(imm32) => pc += forward,
            JMP32_JNE_K => {}
            JMP_JA => pc += forward,
            JMP_EXIT => return r[0],
            other => panic!("an instruction the interpreter does not know: {other:#x}"),
        }
    }
    panic!("the program ran past its length: a jump backwards?")
}

#[test]
fn the_programs_refuse_the_metadata_services_and_nothing_else() {
    let v4 = program(Family::V4);
    let v6 = program(Family::V6);
    for (address, refused) in [
        ("169.254.169.254", true),
        ("169.254.170.2", true),
        ("169.254.0.0", true),
        ("169.254.255.255", true),
        ("100.100.100.200", true),
        ("169.253.169.254", false),
        ("169.255.0.1", false),
        ("168.254.169.254", false),
        ("254.169.169.254", false),
        ("100.100.100.201", false),
        ("127.0.0.1", false),
        ("10.0.0.1", false),
        ("0.0.0.0", false),
    ] {
        let a: Ipv4Addr = address.parse().unwrap();
        assert_eq!(verdict(&v4, IpAddr::V4(a)), u64::from(!refused), "{address}");
        // The same address IPv4-mapped on an IPv6 socket.
        assert_eq!(verdict(&v6, IpAddr::V6(a.to_ipv6_mapped())), u64::from(!refused), "::ffff:{address}");
    }
    for (address, refused) in [
        ("fd00:ec2::254", true),
        ("fd00:ec2::23", true),
        ("fd20:ce::254", true),
        ("fe80::a9fe:a9fe", true),
        ("fd00:ec2::255", false),
        ("fd00:ec2:0:1::254", false),
        ("fd00:ec3::254", false),
        ("fd00::254", false),
        ("::169.254.169.254", false),
        ("64:ff9b::1.1.1.1", false),
        ("::1", false),
        ("2001:db8::1", false),
        ("::", false),
    ] {
        let a: Ipv6Addr = address.parse().unwrap();
        assert_eq!(verdict(&v6, IpAddr::V6(a)), u64::from(!refused), "{address}");
    }
}

#[test]
fn a_program_the_kernel_refuses_is_refused_with_the_verifiers_words() {
    // It returns without setting r0.
    let unset = [Insn::new(JMP_EXIT, 0, 0, 0, 0)];
    let e = load_program(&unset, HOOKS[0]).unwrap_err();
    assert!(e.contains("the verifier says") && e.contains("R0"), "{e}");
    for hook in HOOKS {
        load(hook).unwrap();
    }
}

fn state() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Runs `script` in a box of `sandbox`'s, with `env`; its output, standard error after standard output.
async fn run(sandbox: &Sandbox, script: &str, env: &[(&str, String)]) -> String {
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let id = OperationId::from_random([0xfe; 16]);
    let (mut cmd, boxed) = sandbox.prepare(id, script.as_bytes(), &env, &RunLimits::default(), sandbox.run_as).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await;
    boxed.dispose();
    let out = out.unwrap().unwrap();
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    output
}

/// Tries each destination from inside a box and prints `<name> ok` or `<name> <errno>`.
const PROBES: &str = r#"
import os, socket
def probe(name, family, kind, address, send=False):
    s = socket.socket(family, kind)
    s.settimeout(3)
    try:
        if send:
            s.sendto(b"x", address)
        else:
            s.connect(address)
        print(name, "ok")
    except OSError as e:
        print(name, e.errno)
    finally:
        s.close()
INET, INET6, TCP, UDP = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
probe("tcp4-imds", INET, TCP, ("169.254.169.254", 80))
probe("tcp4-ecs", INET, TCP, ("169.254.170.2", 80))
probe("tcp6-imds", INET6, TCP, ("fd00:ec2::254", 80))
probe("tcp6-mapped-imds", INET6, TCP, ("::ffff:169.254.169.254", 80))
probe("udp4-connect-imds", INET, UDP, ("169.254.169.254", 53))
probe("udp4-send-imds", INET, UDP, ("169.254.169.254", 53), send=True)
probe("udp6-send-imds", INET6, UDP, ("fd00:ec2::254", 53), send=True)
probe("udp6-mapped-send-imds", INET6, UDP, ("::ffff:169.254.169.254", 53), send=True)
probe("tcp4-listener", INET, TCP, ("127.0.0.1", int(os.environ["PORT"])))
"#;

#[tokio::test]
async fn boxed_code_cannot_reach_the_metadata_service_and_the_rest_is_untouched() {
    let state = state();
    let sandbox = Sandbox::open(state.path(), None, &Default::default()).unwrap();
    assert_eq!(sandbox.cloud_metadata(), crate::control::CloudMetadata::Fenced, "the tests run as root");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let output = run(&sandbox, "exec python3 -c \"$PROBES\"", &[("PROBES", PROBES.to_owned()), ("PORT", port)]).await;
    let answers: BTreeMap<&str, &str> = output.lines().filter_map(|l| l.split_once(' ')).collect();
    let eperm = libc::EPERM.to_string();
    for name in [
        "tcp4-imds",
        "tcp4-ecs",
        "tcp6-imds",
        "tcp6-mapped-imds",
        "udp4-connect-imds",
        "udp4-send-imds",
        "udp6-send-imds",
        "udp6-mapped-send-imds",
    ] {
        assert_eq!(answers.get(name), Some(&eperm.as_str()), "{name} is refused with EPERM: {output}");
    }
    assert_eq!(answers.get("tcp4-listener"), Some(&"ok"), "the rest of the network is reachable: {output}");

    // The appliance itself, outside every cell, is not held: it reaches the service where
    // there is one, and otherwise fails as the network fails, never with EPERM.
    let outside = std::net::TcpStream::connect_timeout(&"169.254.169.254:80".parse().unwrap(), Duration::from_secs(1));
    assert!(outside.as_ref().err().and_then(io::Error::raw_os_error) != Some(libc::EPERM), "{outside:?}");
}

/// How many programs are attached to `dir` itself at each hook.
fn attached_counts(dir: &Path) -> Vec<usize> {
    let dir = std::fs::File::open(dir).unwrap();
    HOOKS.iter().map(|hook| attached(dir.as_raw_fd(), hook.attach_type).unwrap().len()).collect()
}

#[test]
fn a_restart_leaves_one_fence_per_hook() {
    let state = state();
    let mut first = Sandbox::open(state.path(), None, &Default::default()).unwrap();
    let cells = first.cells.as_ref().expect("cgroup v2 is available to the tests").dir().to_owned();
    assert_eq!(attached_counts(&cells), [1; HOOKS.len()]);
    // A restart finds the cells directory as the previous process left it.
    first.leave_shared_dirs();
    let mut second = Sandbox::open(state.path(), None, &Default::default()).unwrap();
    assert_eq!(second.cloud_metadata(), crate::control::CloudMetadata::Fenced);
    assert_eq!(attached_counts(&cells), [1; HOOKS.len()]);
    second.leave_shared_dirs();
    let third = Sandbox::open(state.path(), None, &Default::default()).unwrap();
    assert_eq!(attached_counts(&cells), [1; HOOKS.len()]);
    drop((first, second, third));
    assert!(!cells.exists(), "the cells directory, and the fence with it, goes with the last sandbox");
}
