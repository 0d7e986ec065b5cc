#!/usr/bin/env python3
"""A FUSE file system that never answers the agent (a test fixture; raw /dev/fuse protocol,
run as root). It serves one executable, `prog` (the bytes of SRC), and answers every request
except OPEN and READ requests made by threads of process AGENT_PID, which it never answers,
as a user's FUSE daemon may choose to. Each one it holds is printed on stdout.
Usage: hung_fuse.py MOUNTPOINT SRC AGENT_PID"""
import ctypes, errno, os, struct, sys

mnt, src, agent = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(src, "rb").read()
fd = os.open("/dev/fuse", os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
if libc.mount(b"reviewfuse", mnt.encode(), b"fuse", 0, opts) != 0:
    sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")

ROOT, PROG = 1, 2
def attr(ino):
    if ino == ROOT:
        mode, size, nlink = 0o040755, 0, 2
    else:
        mode, size, nlink = 0o100755, len(data), 1
    return struct.pack("<QQQQQQIIIIIIIIII", ino, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0,
                       mode, nlink, 0, 0, 0, 4096, 0)

def reply(unique, err=0, body=b""):
    os.write(fd, struct.pack("<IiQ", 16 + len(body), -err, unique) + body)

def tgid(pid):
    try:
        for l in open(f"/proc/{pid}/status"):
            if l.startswith("Tgid:"):
                return int(l.split()[1])
    except OSError:
        return -1
    return -1

hung = 0
while True:
    try:
        req = os.read(fd, 1 << 20)
    except OSError as e:
        if e.errno in (errno.ENODEV,):
            break
        if e.errno == errno.EINTR:
            continue
        raise
    ln, op, unique, node, uid, gid, pid, _ = struct.unpack("<IIQQIIII", req[:40])
    arg = req[40:ln]
    if op == 26:  # INIT
        major, minor, ra, flags = struct.unpack("<IIII", arg[:16])
        reply(unique, 0, struct.pack("<IIIIHHIIHHII", 7, 31, ra, 0, 16, 12, 131072, 1, 32, 0, 0, 0) + b"\0" * 24)
    elif op == 1:  # LOOKUP
        name = arg.split(b"\0")[0]
        if node == ROOT and name == b"prog":
            reply(unique, 0, struct.pack("<QQQQII", PROG, 0, 3600, 3600, 0, 0) + attr(PROG))
        else:
            reply(unique, errno.ENOENT)
    elif op == 3:  # GETATTR
        reply(unique, 0, struct.pack("<QII", 3600, 0, 0) + attr(node))
    elif op in (14, 15) and tgid(pid) == agent:  # OPEN/READ by the agent: never answered
        hung += 1
        print(f"hanging {'OPEN' if op == 14 else 'READ'} from the agent (tid {pid}), {hung} so far", flush=True)
    elif op == 14:  # OPEN
        reply(unique, 0, struct.pack("<QII", 1, 2, 0))  # FOPEN_KEEP_CACHE
    elif op == 27:  # OPENDIR
        reply(unique, 0, struct.pack("<QII", 1, 0, 0))
    elif op == 15:  # READ
        fh, off, size = struct.unpack("<QQI", arg[:20])
        reply(unique, 0, data[off:off + size])
    elif op in (2, 42):  # FORGET, BATCH_FORGET: no answer
        pass
    elif op == 36:  # INTERRUPT
        pass
    elif op in (18, 25, 29):  # RELEASE, FLUSH, RELEASEDIR
        reply(unique)
    elif op == 22:  # GETXATTR
        reply(unique, errno.ENODATA)
    elif op == 38:  # DESTROY
        reply(unique)
        break
    else:
        reply(unique, errno.ENOSYS)
