#!/usr/bin/python3
"""A hostile vendor's release, probing its box from the inside (`hostile_release.rs`).

Run as `probe MODE`: MODE names who runs it (`attacker`, `rooty`: services; `check`: an exec
health check; `task`: a release task). Each attempt prints one line:
`BLOCKED <mode>:<probe> <errno>` when the box held, `GOT-THROUGH <mode>:<probe> <what>` when it
did not, `INFO <mode>:<probe> <what>` for what the box allows by design. The targets (the
appliance's state directory, its pid, the releases root...) are in `targets.json`, which the
test wrote into the release. `PROBES-DONE` ends the probes.
"""
import ctypes
import errno
import json
import os
import signal
import socket
import ssl
import sys
import time

MODE = sys.argv[1] if len(sys.argv) > 1 else "unknown"
T = json.load(open("targets.json"))
LINES = []
libc = ctypes.CDLL(None, use_errno=True)


def say(kind, probe, detail=""):
    line = f"{kind} {MODE}:{probe} {detail}".rstrip()
    LINES.append(line)
    print(line, flush=True)


class Refused(Exception):
    """The other side refused: the attempt did not get through."""


def attempt(probe, fn):
    try:
        got = fn()
    except ssl.SSLError as e:  # an OSError too, whose errno is OpenSSL's, not the kernel's
        say("BLOCKED", probe, f"SSLError: {e.reason}")
        return
    except OSError as e:
        say("BLOCKED", probe, errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__)
        return
    except (Refused, ssl.SSLError, MemoryError, ValueError) as e:
        say("BLOCKED", probe, f"{type(e).__name__}: {e}"[:160])
        return
    say("GOT-THROUGH", probe, repr(got)[:160])


def oserror():
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e))


def read1(path):
    if os.path.isdir(path):
        return os.listdir(path)
    with open(path, "rb") as f:
        return f.read(16)


def open_for_write(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    os.close(fd)
    return "opened for writing"


def same_mode(path):
    """chmod to the mode the file has: harmless, but only allowed to who may change it."""
    st = os.stat(path)
    os.chmod(path, st.st_mode & 0o7777)
    return f"chmod {oct(st.st_mode & 0o7777)}"


def same_owner(path):
    st = os.stat(path, follow_symlinks=False)
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    return f"chown {st.st_uid}:{st.st_gid}"


def create_in(directory, name):
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.unlink(path)
    return f"created {path}"


def plant_link(directory, name, to):
    path = os.path.join(directory, name)
    os.symlink(to, path)
    os.unlink(path)
    return f"symlinked {path}"


def file_probes(tag, path):
    if os.path.realpath(path).startswith(os.getcwd()):
        # `current`, once it names this release: its own, readable by design.
        say("INFO", f"{tag}:own-release:{path}")
        return
    attempt(f"{tag}:read:{path}", lambda: read1(path))
    attempt(f"{tag}:write:{path}", lambda: open_for_write(path))
    attempt(f"{tag}:chmod:{path}", lambda: same_mode(path))
    attempt(f"{tag}:chown:{path}", lambda: same_owner(path))


def state_dir():
    s = T["state_dir"]
    for path in [s] + T["state_files"]:
        file_probes("state", path)
    attempt("state:create", lambda: create_in(s, "planted-by-vendor"))
    attempt("state:symlink", lambda: plant_link(s, "planted-link", "/tmp"))
    home = os.environ.get("HOME", "/nonexistent")
    for key in T["state_files"]:
        if key.endswith(".key") or key.endswith(".pem"):
            attempt(f"state:hardlink:{key}", lambda key=key: os.link(key, os.path.join(home, "stolen")) or "linked")


def admin_socket():
    def connect():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(T["admin_socket"])
        s.sendall(b'{"cmd": "status"}\n')
        reply = s.recv(65536)
        if b'"ok"' not in reply:
            raise Refused(reply.decode(errors="replace")[:120])
        return reply[:80]

    attempt("admin-socket:status", connect)

    def enable_deploy():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(T["admin_socket"])
        s.sendall(b'{"cmd": "phase", "phase": "operate", "enabled": true}\n')
        reply = s.recv(65536)
        if b'"ok"' not in reply:
            raise Refused(reply.decode(errors="replace")[:120])
        return reply[:80]

    attempt("admin-socket:phase", enable_deploy)


def customer_files():
    for path in T["customer_files"]:
        file_probes("customer", path)


def releases_dir():
    root = T["releases_root"]
    for path in [root] + T["release_paths"]:
        file_probes("releases", path)
    attempt("releases:create", lambda: create_in(root, "planted-by-vendor"))
    attempt("releases:current.new", lambda: plant_link(root, "current.new", T["own_digest_guess"]))
    attempt("releases:rename-current", lambda: os.rename(os.path.join(root, "current"), os.path.join(root, "current.old")))
    logs = os.path.join(root, ".logs")
    attempt("releases:create-log", lambda: create_in(logs, "web.log.1"))
    for other in T["other_releases"]:
        attempt(f"releases:create-in:{other}", lambda other=other: create_in(other, "planted-by-vendor"))
    # Its own installed release: readable, never writable, modes as installed.
    own = os.getcwd()
    attempt("own-release:create", lambda: create_in(own, "planted-by-vendor"))
    for name in ["bin/probe", "targets.json", "bin/suid"]:
        path = os.path.join(own, name)
        attempt(f"own-release:write:{name}", lambda path=path: open_for_write(path))
        attempt(f"own-release:chmod:{name}", lambda path=path: same_mode(path))
        attempt(f"own-release:setuid:{name}", lambda path=path: os.chmod(path, 0o4755) or "setuid bit set")
        attempt(f"own-release:unlink:{name}", lambda path=path: os.unlink(path) or "unlinked")


def installed_modes():
    """What install made of the artifacts: no setuid, setgid or file capability survives."""
    own = os.getcwd()
    for dirpath, dirnames, filenames in os.walk(own):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mode & 0o6000:
                say("GOT-THROUGH", f"install:mode:{path}", oct(st.st_mode))
            if os.path.islink(path):
                say("GOT-THROUGH", f"install:symlink:{path}", os.readlink(path))
            try:
                xattrs = os.listxattr(path, follow_symlinks=False)
            except OSError:
                xattrs = []
            if any(x.startswith("security.") for x in xattrs):
                say("GOT-THROUGH", f"install:xattr:{path}", str(xattrs))
    say("INFO", "install:modes-checked", own)


def pids_of_others():
    """The appliance, and every other process of the release (another box) it can see."""
    me = os.getpid()
    found = {int(T["appliance_pid"]): "appliance"}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmdline)
        if b"http.server" in text:
            found[int(entry)] = "web"
        elif b"/bin/probe" in text and cmdline[-2:-1] != [MODE.encode()]:
            found[int(entry)] = "probe-" + (cmdline[-2].decode(errors="replace") if len(cmdline) > 1 else "?")
    return found


def ptrace_attach(pid):
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        raise oserror()
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    return "attached"


def processes():
    targets = pids_of_others()
    say("INFO", "processes:targets", json.dumps(sorted(set(targets.values()))))
    # A few of each kind (the attacker's fork bomb may be holding hundreds).
    chosen = {}
    for pid, who in sorted(targets.items()):
        chosen.setdefault(who, []).append(pid)
    for pid, who in sorted((pid, who) for who, pids in chosen.items() for pid in pids[:3]):
        tag = f"proc:{who}"
        attempt(f"{tag}:environ", lambda pid=pid: open(f"/proc/{pid}/environ", "rb").read(64))
        attempt(f"{tag}:mem", lambda pid=pid: open(f"/proc/{pid}/mem", "rb").close() or "opened")
        # Its descriptors: the magic links would reopen what it has open (keys, the audit log).
        attempt(f"{tag}:fd-link", lambda pid=pid: os.readlink(f"/proc/{pid}/fd/0"))
        attempt(f"{tag}:fd-reopen", lambda pid=pid: open(f"/proc/{pid}/fd/0", "rb").close() or "reopened")
        attempt(f"{tag}:root", lambda pid=pid: os.listdir(f"/proc/{pid}/root/"))
        attempt(f"{tag}:cwd", lambda pid=pid: os.readlink(f"/proc/{pid}/cwd"))
        attempt(f"{tag}:signal", lambda pid=pid: os.kill(pid, 0) or "may signal")
        attempt(f"{tag}:stop", lambda pid=pid: os.kill(pid, signal.SIGCONT) or "sent SIGCONT")
        attempt(f"{tag}:ptrace", lambda pid=pid: ptrace_attach(pid))


def privileges():
    status = open("/proc/self/status").read()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("NoNewPrivs", "").strip() != "1":
        say("GOT-THROUGH", "privileges:no_new_privs", fields.get("NoNewPrivs", "?").strip())
    # CAP_SYS_ADMIN 21, CAP_SYS_PTRACE 19, CAP_SYS_MODULE 16, CAP_SYS_RAWIO 17, CAP_MKNOD 27,
    # CAP_NET_ADMIN 12, CAP_SYS_TIME 25, CAP_SETFCAP 31, CAP_BPF 39
    # The bounding set matters to root only: no_new_privs keeps a box user from gaining any.
    for name in ["CapEff", "CapPrm", "CapAmb"] + (["CapBnd"] if os.getuid() == 0 else []):
        caps = int(fields.get(name, "0").strip(), 16)
        for bit in [12, 16, 17, 19, 21, 25, 27, 31, 39]:
            if caps & (1 << bit):
                say("GOT-THROUGH", f"privileges:{name}:cap{bit}", hex(caps))
    say("INFO", "privileges:uid", f"{os.getuid()} caps {fields.get('CapEff', '?').strip()}")
    if os.getuid() != 0:
        attempt("privileges:setuid0", lambda: os.setuid(0) or "became root")
    home = os.environ.get("HOME", "/nonexistent")
    attempt("privileges:mknod", lambda: os.mknod(os.path.join(home, "disk"), 0o600 | 0o060000, os.makedev(8, 0)) or "made a block device")


def network():
    host, port = T["gateway"].rsplit(":", 1)

    def gateway_without_identity():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="gateway") as s:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                data = s.recv(64)
                if not data:
                    raise Refused("closed without a word")
                return data

    attempt("network:gateway-without-the-appliance-key", gateway_without_identity)


def sysv_ipc():
    # IPC_PRIVATE, 1 MiB, IPC_CREAT | 0600: a segment outlives its creator unless removed.
    shm = libc.shmget(0, 1 << 20, 0o1000 | 0o600)
    say("INFO", "ipc:shm-created", str(shm))
    seen = open("/proc/sysvipc/shm").read().splitlines()[1:]
    say("INFO", "ipc:shm-visible", str(len(seen)))
    for line in seen:
        fields = line.split()
        if len(fields) > 8 and fields[1] != str(shm) and int(fields[7]) != os.getuid():
            say("GOT-THROUGH", "ipc:sees-another-owners-segment", f"id {fields[1]} uid {fields[7]}")


def writable_elsewhere():
    for d in ["/tmp", "/var/tmp", "/dev/shm", "/run", "/etc", "/opt"]:
        attempt(f"fs:create-in:{d}", lambda d=d: create_in(d, f"planted-by-vendor-{os.getpid()}"))


def exhaust():
    """Against its limits, holding them for a while: the appliance and the web service serve on."""
    import resource

    say("INFO", "limits", json.dumps({
        "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
        "data": resource.getrlimit(resource.RLIMIT_DATA),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
    }))
    home = os.environ["HOME"]

    def past_file_size():
        with open(os.path.join(home, "big"), "wb") as f:
            f.seek(1 << 30)
            f.write(b"x")
            f.flush()
        return "wrote past 1 GiB"

    attempt("exhaust:file-past-its-size-limit", past_file_size)

    def memory():
        block = bytearray(6 << 30)
        return f"{len(block)} bytes"

    attempt("exhaust:memory-6GiB", memory)

    held = []
    try:
        while len(held) < 100000:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        say("INFO", "exhaust:open-files", f"{len(held)} then {errno.errorcode.get(e.errno)}")
    if len(held) > 1100:
        say("GOT-THROUGH", "exhaust:open-files", str(len(held)))

    children = []
    try:
        while len(children) < 5000:
            pid = os.fork()
            if pid == 0:
                time.sleep(25)
                os._exit(0)
            children.append(pid)
    except OSError as e:
        say("INFO", "exhaust:fork-bomb", f"{len(children)} then {errno.errorcode.get(e.errno)}")
    if len(children) > int(T["process_limit"]) + 8:
        say("GOT-THROUGH", "exhaust:fork-bomb", str(len(children)))
    say("INFO", "EXHAUST-HOLDING")
    time.sleep(15)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    for fd in held:
        os.close(fd)
    # The crash loop may start: `crasher` looks for this process name.
    libc.prctl(15, b"hostile-go", 0, 0, 0)  # PR_SET_NAME
    say("INFO", "EXHAUST-DONE")


def spew(seconds):
    """Output as fast as the pipe takes it: the appliance copies it into its log."""
    chunk = b"x" * 65535 + b"\n"
    end = time.monotonic() + seconds
    written = 0
    while time.monotonic() < end:
        written += os.write(1, chunk)
    print(f"INFO spew:written {written}", flush=True)


def main():
    if MODE == "spewer":
        spew(20)
        while True:
            time.sleep(3600)
    if MODE == "check":
        # Probe once: when the test has its report it stops listening, and checks just pass.
        try:
            report = socket.create_connection(("127.0.0.1", int(T["report_port"])), timeout=5)
        except OSError:
            return 0
    state_dir()
    admin_socket()
    customer_files()
    releases_dir()
    installed_modes()
    processes()
    privileges()
    network()
    sysv_ipc()
    writable_elsewhere()
    say("INFO", "PROBES-DONE")
    if MODE == "check":
        report.sendall(("\n".join(LINES) + "\n").encode())
        report.close()
        return 0
    if MODE == "attacker":
        exhaust()
    if MODE in ("attacker", "rooty"):
        while True:
            time.sleep(3600)
    return 0


sys.exit(main())
