"""A Workload API peer for tests/tests/e2e/workload_binding.rs.

Connects the Unix socket it got as its standard input (the test keeps another descriptor
of the same socket and speaks gRPC on it) to the agent's Workload API socket, so the
kernel records *this* process as the connection's peer. Then, by ACTION:

  exit      exit at once (the test reaps it: the connection outlives its process);
  stay      report and sleep until killed (a live, unchanged peer);
  exec      report, wait for SIGUSR1, then exec PROGRAM ARGS... (the peer changes program);
  exec-now  report and exec PROGRAM ARGS... at once (racing the agent's accept);
  drop      report, wait for SIGUSR1, then switch to uid and gid ID (a privilege drop);
  zombie    report, wait for SIGUSR1, then exit (the test leaves it unreaped: a zombie);
  thread-exec  connect from a thread that is not the leader, report, and on SIGUSR2
               end the leader thread (the process goes on), on SIGUSR1 exec PROGRAM
               ARGS... from the other thread;
  thread-late  end the leader thread first, then connect from the other thread, report,
               and on SIGUSR1 exec PROGRAM ARGS... from it.

It never reads or writes the socket: the bytes on it belong to the test.

usage: workload_peer.py SOCKET_PATH ACTION [PROGRAM ARGS... | ID]
"""
import os
import signal
import socket
import sys
import time


def leader_exits():
    """Ends the calling (leader) thread alone, without ending the process; ctypes
    releases the GIL around the call, so the other threads run on."""
    import ctypes
    ctypes.CDLL(None).pthread_exit(None)


def threaded(path, action):
    import threading
    connected = threading.Event()

    def other_thread():
        if action == "thread-late":
            # The leader is gone once /proc shows the process (its leader) as a zombie.
            while open("/proc/self/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                time.sleep(0.01)
        sock = socket.socket(fileno=0)
        sock.setblocking(True)
        sock.connect(path)
        print("connected %d" % os.getpid(), flush=True)
        connected.set()
        signal.sigwait({signal.SIGUSR1})
        os.execv(sys.argv[3], sys.argv[3:])

    threading.Thread(target=other_thread).start()
    if action == "thread-exec":
        connected.wait()
        signal.sigwait({signal.SIGUSR2})
    leader_exits()


def main():
    path, action = sys.argv[1], sys.argv[2]
    if action.startswith("thread-"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
        threaded(path, action)
    if action in ("exec", "drop", "zombie"):
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
    if action == "zombie":
        signal.sigwait({signal.SIGUSR1})
        os._exit(0)
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
