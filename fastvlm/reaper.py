"""A watchdog that ends the processes a driver started once the driver is gone — even SIGKILLed.

Why: a SIGKILLed process runs no cleanup, and a local Ray cluster's agents (DashboardAgent,
RuntimeEnvAgent) outlive a killed `fastvlm batch --ray` driver. The watchdog is a small child in
its own session that holds the read end of a pipe from the driver: it records the driver's
process tree every `POLL_S`, and when the pipe closes (the driver exited, however) it sends
SIGTERM, then SIGKILL, to every recorded process still alive (matched by pid *and* start time,
so a reused pid is never hit). Linux only (/proc); elsewhere `start` returns None.

Run as a script (stdlib only, so it starts in milliseconds without importing torch):
`python reaper.py DRIVER_PID`.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 3.0


def _children() -> dict[int, list[tuple[int, int]]]:
    """ppid → [(pid, start time)] from /proc."""
    out: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()  # the name in () may contain spaces
        out.setdefault(int(rest[1]), []).append((int(name), int(rest[19])))
    return out


def descendants(root: int) -> dict[int, int]:
    """pid → start time of every process below `root`."""
    children, found, todo = _children(), {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _kill_all(seen: dict[int, int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p, t in seen.items() if _start_time(p) == t]
        for p in alive:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_S
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _start_time(p) == seen[p]]
        if not alive:
            return


def watch(driver: int, fd: int = 0) -> None:
    """Record `driver`'s process tree until `fd` reaches EOF, then end what is left of it."""
    before = set(descendants(driver).items())  # only what the driver starts from now on
    me, seen = os.getpid(), {}

    def record() -> None:
        now = descendants(driver).items()
        seen.update({p: t for p, t in now if p != me and (p, t) not in before})

    while True:
        record()
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready and not os.read(fd, 4096):
            break
    record()  # a clean stop: the driver is alive, so what it started since the last poll counts
    _kill_all(seen)


def start(driver: int | None = None) -> subprocess.Popen | None:
    """Start the watchdog for this process (or `driver`); close its stdin (`stop`) to trigger
    it after a clean shutdown. None where /proc is missing."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return None
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(driver or os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the driver's process group: Ctrl-C does not reach it
    )


def stop(proc: subprocess.Popen | None, wait_s: float = 10.0) -> None:
    """Close the pipe (the watchdog then ends the leftovers) and wait for it to finish."""
    if proc is None:
        return
    try:
        proc.stdin.close()
        proc.wait(timeout=wait_s)
    except (OSError, subprocess.TimeoutExpired):
        pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
