"""A Workload API peer for tests/tests/workload_binding.rs.

Connects the Unix socket it got as its standard input (the test keeps another descriptor
of the same socket and speaks gRPC on it) to the agent's Workload API socket, so the
kernel records *this* process as the connection's peer. Then, by ACTION:

  exit      exit at once (the test reaps it: the connection outlives its process);
  stay      report and sleep until killed (a live, unchanged peer);
  exec      report, wait for SIGUSR1, then exec PROGRAM ARGS... (the peer changes program);
  exec-now  report and exec PROGRAM ARGS... at once (racing the agent's accept);
  drop      report, wait for SIGUSR1, then switch to uid and gid ID (a privilege drop).

It never reads or writes the socket: the bytes on it belong to the test.

usage: workload_peer.py SOCKET_PATH ACTION [PROGRAM ARGS... | ID]
"""
import os
import signal
import socket
import sys
import time


def main():
    path, action = sys.argv[1], sys.argv[2]
    if action in ("exec", "drop"):
        # Blocked before reporting, so a signal sent right after the report is not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    sock = socket.socket(fileno=0)
    sock.setblocking(True)
    sock.connect(path)
    if action == "exit":
        os._exit(0)
    print("connected %d" % os.getpid(), flush=True)
    if action == "stay":
        while True:
            time.sleep(3600)
    if action == "exec":
        signal.sigwait({signal.SIGUSR1})
        os.execv(sys.argv[3], sys.argv[3:])
    if action == "exec-now":
        os.execv(sys.argv[3], sys.argv[3:])
    if action == "drop":
        signal.sigwait({signal.SIGUSR1})
        os.setgroups([])
        os.setgid(int(sys.argv[3]))
        os.setuid(int(sys.argv[3]))
        while True:
            time.sleep(3600)
    sys.exit("unknown action %r" % action)


main()
