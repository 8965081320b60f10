"""The child side of `rewards.code.run_tests`: run as `python -I _child.py JOB_FILE`, never imported.

It sets its own resource limits first (rather than a `preexec_fn` in the parent, which is unsafe while the
parent's thread pool forks), reads and deletes the job file, and installs an audit hook that refuses
network, process creation and signals to other processes. Then it runs the solution and each test in one
namespace. Each passing test is reported as one line `<nonce> pass <index>` on the inherited result pipe;
the nonce keeps the solution's own output from counting (best effort: the solution runs in this process
and could still find it).
"""

import json
import os
import resource
import socket
import sys

_NETWORK_EVENTS = {
    "socket.bind",
    "socket.connect",
    "socket.sendto",
    "socket.sendmsg",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
}
_PROCESS_EVENTS = {
    "os.fork",
    "os.forkpty",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.system",
    "subprocess.Popen",
}


def _limit(kind: int, value: int) -> None:
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _audit(event: str, args: tuple) -> None:
    # Audit hooks cannot be removed once added, unlike a patched socket module. AF_UNIX sockets stay
    # allowed (socketpair, asyncio's self-pipe) but cannot connect or bind.
    if event in _NETWORK_EVENTS or (event == "socket.__new__" and args[1] != socket.AF_UNIX):
        raise PermissionError(f"network access is blocked by the reward sandbox ({event})")
    if event in _PROCESS_EVENTS:
        raise PermissionError(f"starting processes is blocked by the reward sandbox ({event})")
    # Signals only to itself or its own group: the trainer runs as the same user.
    if (event == "os.kill" and args[0] not in (0, os.getpid())) or (
        event == "os.killpg" and args[0] not in (0, os.getpgrp())
    ):
        raise PermissionError(f"signalling other processes is blocked by the reward sandbox ({event})")


def main() -> None:
    job_file = sys.argv[1]
    with open(job_file) as f:
        job = json.load(f)
    os.remove(job_file)
    memory = job["memory_mb"] * 1024 * 1024
    _limit(resource.RLIMIT_AS, memory)
    _limit(resource.RLIMIT_CPU, job["cpu_s"])  # a backstop; the parent's wall-clock timeout comes first
    _limit(resource.RLIMIT_FSIZE, job["file_mb"] * 1024 * 1024)
    _limit(resource.RLIMIT_CORE, 0)
    nonce, result_fd = job["nonce"], job["result_fd"]
    code, tests = job["code"], job["tests"]
    del job
    sys.addaudithook(_audit)

    namespace = {"__name__": "__solution__"}  # not __main__: a solution's main() would wait for input
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
    except BaseException:
        return  # the solution itself fails: every test fails
    for index, (source, counted) in enumerate(tests):
        try:
            exec(compile(source, f"<test {index}>", "exec"), namespace)
        except BaseException:
            continue
        if counted:
            try:
                os.write(result_fd, f"{nonce} pass {index}\n".encode())
            except OSError:
                return


if __name__ == "__main__":
    main()
