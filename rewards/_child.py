"""The child side of `rewards.code.run_tests`: run as `python -I -B _child.py JOB_FILE`, never imported.

It sets its own resource limits first (rather than a `preexec_fn` in the parent, which is unsafe while the
parent's thread pool forks), reads and deletes the job file, and installs an audit hook that refuses
network, process creation, signals to other processes and changes to files outside its working directory
(the sandbox folder). Then it runs the solution and each test in one namespace. Each passing test is
reported as one line `<nonce> pass <index>` on the inherited result pipe; the nonce keeps the solution's
own output from counting (best effort: the solution runs in this process and could still find it).
"""

import _posixsubprocess
import json
import os
import resource
import socket
import stat
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

# The events of Python 3.11's audit table that change the file system, with the positions of their path
# arguments: (path, dir_fd or None). Reading stays allowed. Covered through these: os.unlink (os.remove),
# os.replace and os.renames (os.rename), os.makedirs (os.mkdir), os.removedirs (os.rmdir), os.lchmod and
# os.fchmod (os.chmod), os.lchown and os.fchown (os.chown), os.ftruncate (os.truncate), and pathlib's
# write_text, unlink, rename, touch, mkdir, hardlink_to and symlink_to. Writes through `open` and `os.open`
# are checked in `_audit`. Not covered, as 3.11 raises no event for them: os.mkfifo and os.mknod.
_FILE_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),  # the source too: writing to a hard link writes to the outside file
    "os.symlink": ((1, 2),),  # only the new link: writes through it are checked where it points
    "os.truncate": ((0, None),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "shutil.rmtree": ((0, 1),),
    "shutil.copyfile": ((1, None),),
    "shutil.copymode": ((1, None),),
    "shutil.copystat": ((1, None),),
    "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)),
    "shutil.make_archive": ((0, None),),
    "shutil.unpack_archive": ((1, None),),
    "sqlite3.connect": ((0, None),),  # sqlite opens its files itself, without an "open" event
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITABLE = {"/dev/null"}  # outside the sandbox, yet harmless to write
_WRITES_BLOCKED = "file system writes outside the sandbox folder are blocked by the reward sandbox"
_SANDBOX = ""  # the real path of the working directory, set by main()


def _fd_path(fd: int) -> str:
    # What an open file descriptor refers to: a path, or a name such as `pipe:[123]` (or "" if unknown).
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _inside(path: str) -> bool:
    return path == _SANDBOX or path.startswith(_SANDBOX + os.sep)


def _writable(path, dir_fd: int | None = None) -> bool:
    """Whether the code may change `path` (str, bytes, path-like or a file descriptor)."""
    if path is None:
        return True
    if isinstance(path, int):  # os.fchmod, os.ftruncate, ...: a descriptor opened for reading will do
        target = _fd_path(path)
        # A pipe, socket or the like is no file on the file system.
        return bool(target) and (not target.startswith("/") or _writable(target))
    path = os.fsdecode(path)
    if path in (":memory:", ""):  # sqlite3's in-memory and temporary databases
        return True
    if path.startswith("file:"):  # a sqlite3 URI
        path = path[len("file:") :].partition("?")[0]
    if dir_fd is not None and dir_fd >= 0 and not os.path.isabs(path):
        folder = _fd_path(dir_fd)
        if not folder.startswith("/"):
            return False
        path = os.path.join(folder, path)
    absolute = os.path.abspath(path)  # against the current directory, which the code may have changed
    real = os.path.realpath(absolute)  # where a write lands, after symlinks
    if real in _WRITABLE:
        return True
    # The folder that holds the entry, for removing or renaming a symlink, and an existing entry must not be
    # a device: mknod (no audit event) could make one in the sandbox, for a disk, say.
    entry = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    if not (_inside(real) and _inside(entry)):
        return False
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return True
    return not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode))


def _refuse_fork_exec(*args, **kwargs):
    raise PermissionError("starting processes is blocked by the reward sandbox (_posixsubprocess.fork_exec)")


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
    if event == "open":
        path, mode, flags = args
        writes = bool(flags & _WRITE_FLAGS) or any(c in (mode or "") for c in "wax+")
        # An int is a file descriptor (open(fd, "w")): writing needs it opened for writing, which was checked.
        if writes and not isinstance(path, int) and not _writable(path):
            raise PermissionError(f"{_WRITES_BLOCKED} (open {path!r})")
        # A folder outside, opened by os.open (mode None), could be the dir_fd of a write whose "open" event
        # shows only a relative name: os.open("name", os.O_WRONLY, dir_fd=folder).
        if not writes and mode is None and not isinstance(path, int):
            real = os.path.realpath(os.fsdecode(path))
            if not _inside(real) and os.path.isdir(real):
                raise PermissionError(
                    f"opening folders outside the sandbox folder is blocked by the reward sandbox ({path!r})"
                )
    elif event in _FILE_EVENTS:
        for index, dir_fd in _FILE_EVENTS[event]:
            if not _writable(args[index], None if dir_fd is None else args[dir_fd]):
                raise PermissionError(f"{_WRITES_BLOCKED} ({event} {args[index]!r})")


def main() -> None:
    global _SANDBOX
    _SANDBOX = os.path.realpath(os.getcwd())
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
    # The one way to start a process that raises no audit event in 3.11; multiprocessing's spawn and
    # forkserver start methods use it. subprocess and multiprocessing look it up at each call.
    _posixsubprocess.fork_exec = _refuse_fork_exec
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
