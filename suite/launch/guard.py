"""Each rank's guard: a variant whose rank hangs, dies or is signalled still leaves exactly one record.

Why a thread of our own rather than the backends' timeouts: gloo raises in the waiting rank after the
process group's timeout, but NCCL's own watchdog aborts the whole process at its timeout (no record),
a rank stuck outside a collective is seen by nobody, and a Python signal handler runs only when the
main thread returns from C, which a rank blocked in a collective never does. So every rank runs one
daemon thread that

* watches the main thread's progress: it samples the main thread's innermost frame once a second;
  when that frame has not moved for ``workload.timeout_s`` (a rank blocked in a collective, in a CUDA
  synchronisation or asleep), the rank leaves its stack in ``<out>/errors/`` and rank 0 writes a
  ``failed`` record naming the rank that stopped (the one not waiting in a collective) with every
  stalled rank's stack, then exits 1. Process groups get ``timeout_s + TIMEOUT_MARGIN_S``, so the
  backends' timeouts stay a backstop that fires after the guard (gloo and NCCL alike);
* receives SIGINT and SIGTERM through ``signal.set_wakeup_fd`` (written by the C-level handler, so it
  arrives even while the main thread is blocked): rank 0 writes an ``interrupted`` record (the signal
  and where the main thread was) and exits 128 + the signal (130 for Ctrl-C), unless a peer died
  first, in which case the record is that peer's failure; other ranks leave their note and exit;
* names peers that died without a word: rank 0 knows its local peers' process ids, and a peer that
  is gone and left no note was killed by a signal no handler can catch (SIGKILL: ``kill -9`` or the
  kernel's OOM killer).

The record is written once per attempt under one lock, by whichever of the main thread and the guard
gets there first.
"""
from __future__ import annotations

import glob
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

TIMEOUT_MARGIN_S = 30  # process groups time out this long after the guard, so the guard speaks first
POLL_S = 1.0
PEER_GRACE_S = 5.0     # rank 0 waits at most this long for its peers' notes before it records a hang
EXIT_GRACE_S = 10.0    # other ranks wait this long for rank 0 to record before they exit

_guard: Guard | None = None


def error_dir(out: str) -> str:
    return os.path.join(out, "errors")


def leave_error(out: str, attempt: str, rank: int, error: dict) -> None:
    """A rank's note of its own failure, written before any collective so rank 0 can name the real
    cause even when the failure breaks the process group (ranks share the results folder on one host;
    on several hosts rank 0 falls back to what it saw itself)."""
    os.makedirs(error_dir(out), exist_ok=True)
    # one file per rank and kind: a rank that failed and then stalled keeps both notes
    path = os.path.join(error_dir(out), f"{attempt}.rank{rank}.{error.get('type', 'Error')}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**error, "at": time.time()}, f)
    os.replace(tmp, path)


def left_errors(out: str, attempt: str) -> list[dict]:
    """Every rank's note for this attempt, the first in time first (later ones are its echoes)."""
    notes = []
    for path in glob.glob(os.path.join(error_dir(out), f"{attempt}.rank*.json")):
        try:
            with open(path) as f:
                notes.append(json.load(f))
        except (OSError, ValueError):
            continue
    return sorted(notes, key=lambda e: e.get("at", 0))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _in_collective(stack: str) -> bool:
    last = [line for line in stack.splitlines() if line.strip().startswith("File ")][-1:]
    return bool(last) and f"torch{os.sep}distributed" in last[0]


def _where(stack: str) -> str:
    """'file:line in function' of the innermost frame of a formatted stack."""
    frames = [line.strip() for line in stack.splitlines() if line.strip().startswith("File ")]
    if not frames:
        return "?"
    parts = frames[-1].split('"')
    path = parts[1] if len(parts) > 2 else frames[-1]
    rest = parts[-1].strip(", ")
    return f"{os.path.basename(path)} {rest}"


class Attempt:
    """The variant a rank is running now: where its record goes and what it starts with."""

    def __init__(self, out: str, attempt: str, base: dict, timeout_s: float, finish):
        self.out, self.attempt, self.base, self.timeout_s = out, attempt, base, timeout_s
        self.finish = finish  # finish(status, error) appends the record (rank 0)
        self.recorded = False


class Guard:
    def __init__(self, rank: int, world: int, peers: list[tuple[str, int]]):
        self.rank, self.world = rank, world
        # (rank, pid) of the peers on this host: the ones whose death rank 0 can see
        host = socket.gethostname()
        self.local_peers = [(r, pid) for r, (h, pid) in enumerate(peers) if h == host and r != rank]
        self.lock = threading.Lock()
        self.current: Attempt | None = None
        self.main = threading.main_thread().ident
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)  # the guard thread acts (it got the number)
        threading.Thread(target=self._loop, name="suite-guard", daemon=True).start()

    # --- the main thread's side ---------------------------------------------------------------------

    def begin(self, attempt: Attempt) -> None:
        with self.lock:
            self.current = attempt

    def end(self) -> None:
        with self.lock:
            self.current = None

    def record_once(self, status: str, error: dict | None, **extra) -> bool:
        """Append the attempt's record unless the guard already did; True if this call wrote it."""
        with self.lock:
            a = self.current
            if a is None or a.recorded:
                return False
            a.recorded = True
            a.finish(status, error, **extra)
            return True

    def culprit(self, own: dict | None, wait_s: float = 0.0) -> dict | None:
        """The first cause of a broken attempt: a local peer that died without a note (SIGKILL), else
        the earliest note a rank left, else this rank's own error. Waits up to ``wait_s`` for one."""
        a = self.current
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(r, pid) for r, pid in self.local_peers if not _alive(pid)]
            notes = left_errors(a.out, a.attempt) if a else []
            noted = {n.get("rank") for n in notes}
            silent = [(r, pid) for r, pid in dead if r not in noted]
            if silent:
                r, pid = silent[0]
                return {"type": "RankKilled", "rank": r, "signal": "SIGKILL", "traceback": None,
                        "message": f"rank {r} (pid {pid}) died without running any handler: killed by "
                                   "SIGKILL (kill -9 or the kernel's OOM killer)"}
            others = [n for n in notes if n.get("rank") != self.rank]
            if others or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if others:
            return _strip(others[0])
        mine = [n for n in notes if n.get("rank") == self.rank]
        return _strip(mine[0]) if mine else own

    # --- the guard thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        last, still = None, 0.0
        while True:
            ready, _, _ = select.select([self._read], [], [], POLL_S)
            if ready:
                data = os.read(self._read, 64)
                for signum in data:
                    if signum in (signal.SIGINT, signal.SIGTERM):
                        self._on_signal(signal.Signals(signum))
                continue
            frame = sys._current_frames().get(self.main)
            now = None if frame is None else (id(frame), frame.f_lasti)
            a = self.current
            if a is None or now != last or self.world == 1:
                last, still = now, 0.0
                continue
            still += POLL_S
            if still >= a.timeout_s:
                self._on_hang(a, frame, still)
                last, still = None, 0.0

    def _main_stack(self, frame=None) -> str:
        frame = frame or sys._current_frames().get(self.main)
        return "".join(traceback.format_stack(frame))[-4000:] if frame else ""

    def _on_hang(self, a: Attempt, frame, still: float) -> None:
        stack = self._main_stack(frame)
        note = {"type": "Hang", "rank": self.rank, "traceback": stack, "collective": _in_collective(stack),
                "message": f"rank {self.rank} made no progress for {still:.0f} s (workload.timeout_s = "
                           f"{a.timeout_s:g}) in {_where(stack)}"}
        leave_error(a.out, a.attempt, self.rank, note)
        print(f"[suite] rank {self.rank}: no progress for {still:.0f} s in {_where(stack)}", file=sys.stderr,
              flush=True)
        if self.rank != 0:
            # rank 0 records and torchrun then stops us (a signal ends the wait); exiting after the
            # grace wakes a rank 0 that did not stall
            select.select([self._read], [], [], EXIT_GRACE_S)
            os._exit(1)
        deadline = time.monotonic() + PEER_GRACE_S
        while time.monotonic() < deadline:  # until every local rank left its stack, or one is dead
            noted = {n.get("rank") for n in left_errors(a.out, a.attempt) if n.get("type") == "Hang"}
            if all(r in noted or not _alive(pid) for r, pid in self.local_peers):
                break
            time.sleep(0.1)
        dead = self.culprit(None)
        if dead and dead.get("type") != "Hang":
            error = dead
        else:
            notes = [n for n in left_errors(a.out, a.attempt) if n.get("type") == "Hang"]
            stalled = {n["rank"]: n for n in notes}
            silent = [r for r in range(self.world) if r not in stalled]
            outside = [n for n in notes if not n.get("collective")]
            if outside:
                first = outside[0]
                message = first["message"]
            elif silent:
                first = {"rank": silent[0]}
                message = (f"rank {silent[0]} stopped taking part: ranks {sorted(stalled)} waited in a "
                           f"collective for {still:.0f} s (workload.timeout_s = {a.timeout_s:g})")
            else:
                first = notes[0]
                message = first["message"]
            stacks = "\n".join(f"--- rank {n['rank']} ({'in a collective' if n.get('collective') else 'stopped'})"
                               f"\n{n['traceback']}" for n in notes)
            error = {"type": "Hang", "rank": first["rank"], "message": message, "traceback": stacks[-8000:]}
        self.record_once("failed", error)
        os._exit(1)

    def _on_signal(self, sig: signal.Signals) -> None:
        code = 128 + int(sig)
        a = self.current
        stack = self._main_stack()
        where = _where(stack) if stack else "?"
        own = {"type": "Interrupted", "rank": self.rank, "signal": sig.name, "traceback": stack,
               "message": f"rank {self.rank} received {sig.name}" + (" (Ctrl-C)" if sig == signal.SIGINT else "")
                          + f" in {where}"}
        if a is None:
            os._exit(code)
        if self.rank != 0:
            leave_error(a.out, a.attempt, self.rank, own)
            os._exit(code)
        # rank 0: a peer that died (or left a note) first is the cause; else this signal is
        cause = self.culprit(None, wait_s=0.5 if sig == signal.SIGTERM else 0.0)
        if cause and cause.get("rank") != 0 and cause.get("type") != "Interrupted":
            self.record_once("failed", cause)
            os._exit(1)
        error = cause if cause and cause.get("type") == "Interrupted" else own
        self.record_once("interrupted", error)
        os._exit(code)


def _strip(note: dict) -> dict:
    return {k: v for k, v in note.items() if k not in ("at", "collective")}


def install(rank: int, world: int, peers: list[tuple[str, int]]) -> Guard:
    global _guard
    if _guard is None:
        _guard = Guard(rank, world, peers)
    return _guard
