"""The control plane in shared memory: a doorbell in the first page of each client's region.

ZeroMQ wakes four threads per round trip (client, libzmq I/O threads on both sides, server);
here the two sides poll words of the region they already share. Layout of the first
CONTROL_BYTES of a region (the tensors start after it, at protocol.DATA_START):

    word 0  request sequence   written by the client after the request header (and tensors)
    word 1  reply sequence     written by the server after the reply header
    word 2  server state       AWAKE while the server polls its regions, ASLEEP when it blocks
    word 3  client state       AWAKE while the client polls for its reply, ASLEEP when it blocks on
                               its socket, WAITING when it sleeps on the futex of word 1
    REQUEST_AT  u32 length + the request's header bytes
    REPLY_AT    u32 length + the reply's header bytes

Ordering: data, then header, then the sequence word; the reader reads the sequence word,
then the header, then the data. x86 (TSO) keeps stores in order and loads in order, so no
barrier is needed for that. What TSO does reorder is a store followed by a load of another
word (the store buffer): "I go to sleep" then "is there a request?" on one side against
"here is a request" then "is the server asleep?" on the other. `fence()` (a locked
instruction, a full barrier on x86) sits between each such store and load, so at least one
side sees the other's store: either the server sees the request, or the client sees the
server asleep and rings over ZeroMQ. An ARM host would also need release stores and acquire
loads on the sequence words (docs/architecture.md).

Every field is written by one side only, and each side reads the other's fields as hostile:
lengths are bounded, headers are parsed by protocol.decode_header.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import struct
import sys
import threading
import time

from teegpu.errors import ProtocolError
from teegpu.protocol import CONTROL_BYTES, ErrorCode

REQUEST_SEQ, REPLY_SEQ, SERVER_STATE, CLIENT_STATE = range(4)
ASLEEP, AWAKE, WAITING = 0, 1, 2
REQUEST_AT, REPLY_AT = 64, 2048
MAX_HEADER = REPLY_AT - REQUEST_AT - 4
_LEN = struct.Struct("<I")
# while polling a doorbell, each side looks at its socket (errors, rings, new clients) every this
# many turns: a look (ZMQ_EVENTS) costs about a microsecond, three turns of the doorbell
SOCKET_EVERY = 8
_BARRIER = threading.Lock()


def fence() -> None:
    """A full memory barrier: taking an uncontended lock is a locked instruction (on x86 a full
    fence), so stores before it are visible before loads after it."""
    _BARRIER.acquire()
    _BARRIER.release()


def relax() -> None:
    """One pause of a polling loop: give the core to whoever needs it (on 2 cores the other side's
    compute threads), and come back at once if nobody does."""
    os.sched_yield()


PR_SET_TIMERSLACK, FINE_SLACK_NS = 29, 1_000
_fine = threading.local()


def nap(seconds: float) -> None:
    """Sleep, woken within microseconds of the time asked: Linux lets a sleep overrun by the
    thread's timer slack (50 us by default, a tenth of a millisecond product's wait), so the first
    nap of each thread lowers its slack to FINE_SLACK_NS."""
    if not getattr(_fine, "slack", False):
        _fine.slack = True
        if sys.platform == "linux":
            try:  # a libc without prctl (or a sandbox that refuses it) keeps the default slack
                ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, FINE_SLACK_NS, 0, 0, 0)
            except (OSError, AttributeError):
                pass
    time.sleep(seconds)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine()) if sys.platform == "linux" else None
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE): the word lies in a mapping of two processes


@functools.cache
def _syscall():
    """libc's syscall(2), or None where futexes are not to be had (not Linux, no libc)."""
    if _SYS_FUTEX is None:
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syscall  # a foreign call: it releases the GIL while it blocks
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    return call


def futex_wait(address: int, expected: int, seconds: float) -> int:
    """Sleep while the 32-bit word at `address` holds `expected`, until woken or `seconds` pass.
    0 when woken, else the errno: EAGAIN (the word had changed), EINTR, ETIMEDOUT, or a real error.
    The compare and the sleep are one step in the kernel, so a wake after the change is never lost."""
    ts = _Timespec(int(seconds), int(seconds % 1 * 1e9))
    if _syscall()(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAIT, ctypes.c_uint32(expected),
                  ctypes.byref(ts), None, 0) == 0:
        return 0
    return ctypes.get_errno()


def futex_wake(address: int) -> None:
    _syscall()(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAKE, 1, None, None, 0)


class CpuWait:
    """Whether the calling thread has lately waited for a CPU: the share of wall time it spent
    runnable but not running, from the kernel's schedstat, read every INTERVAL_NS. On a host
    whose cores other tenants keep busy, a side that polls takes the core from whoever computes
    there, so it sleeps on its socket instead, for at least HOLD_NS (docs/architecture.md)."""

    INTERVAL_NS, HOLD_NS = 100_000_000, 2_000_000_000
    # waited half the interval or more: the thread got at most half a CPU, the cores are oversubscribed.
    # Our own two sides make shorter waits (the server's product on every core while the client
    # polls: 0.27 of an interval in a prefill, on an Intel Xeon with AMX), which must not count
    SHARE = 0.5

    def __init__(self):
        self.next_ns = self.last_ns = self.until_ns = 0
        self.last_wait = None
        self.state = False

    def contended(self) -> bool:
        now = time.perf_counter_ns()
        if now < self.next_ns:
            return self.state
        wait = _run_queue_wait_ns()
        if wait is None:  # no schedstat (not Linux): never contended
            self.next_ns = now + self.HOLD_NS * 1000
            return False
        if self.last_wait is not None:
            if (wait - self.last_wait) >= self.SHARE * (now - self.last_ns):
                self.state, self.until_ns = True, now + self.HOLD_NS
            elif now >= self.until_ns:
                self.state = False
        self.last_wait, self.last_ns, self.next_ns = wait, now, now + self.INTERVAL_NS
        return self.state


def _run_queue_wait_ns() -> int | None:
    """Nanoseconds this thread has spent waiting on a run queue (schedstat's second field)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Doorbell:
    """The control words and header slots of one region."""

    def __init__(self, buffer):
        view = memoryview(buffer)
        self.words = view[:32].cast("Q")
        self.bytes = view[:CONTROL_BYTES]
        # where the reply word lies in this process, for futexes (its low half on little-endian x86)
        self.reply_address = 0
        if _syscall() is not None:
            word = ctypes.c_uint64.from_buffer(buffer, REPLY_SEQ * 8)
            self.reply_address = ctypes.addressof(word)
            del word  # the mapping must stay closable: keep the address, not an export of the buffer

    def release(self) -> None:
        """Drop the views (the region's mapping cannot close while they exist)."""
        self.words.release()
        self.bytes.release()

    # -- one side writes a header slot and bumps its sequence word; the other reads them --

    def _write(self, at: int, header: bytes) -> None:
        if len(header) > MAX_HEADER:
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"header of {len(header)} bytes exceeds the doorbell slot")
        self.bytes[at + 4:at + 4 + len(header)] = header
        self.bytes[at:at + 4] = _LEN.pack(len(header))

    def _read(self, at: int) -> bytes:
        (n,) = _LEN.unpack(self.bytes[at:at + 4])
        if n > MAX_HEADER:
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"doorbell header length {n} exceeds the slot")
        return bytes(self.bytes[at + 4:at + 4 + n])

    # -- the client's side --

    def post(self, header: bytes) -> int:
        """Publish a request (its tensors are already in place); its sequence number."""
        self._write(REQUEST_AT, header)
        seq = self.words[REQUEST_SEQ] + 1
        self.words[REQUEST_SEQ] = seq
        fence()
        return seq

    def server_awake(self) -> bool:
        return self.words[SERVER_STATE] == AWAKE

    def replied(self, seq: int) -> bool:
        return self.words[REPLY_SEQ] == seq

    def reply_header(self) -> bytes:
        return self._read(REPLY_AT)

    def set_client(self, state: int) -> None:
        self.words[CLIENT_STATE] = state
        fence()

    def wait_reply(self, seq: int, seconds: float) -> int:
        """WAITING: sleep until the server wakes us (a reply, or news on the socket) or `seconds`
        pass; futex_wait's answer (0: woken or replied already)."""
        now = self.words[REPLY_SEQ]
        return 0 if now == seq else futex_wait(self.reply_address, now & 0xFFFF_FFFF, seconds)

    # -- the server's side --

    def pending(self, handled: int) -> int:
        """The sequence number of a request not handled yet, or 0."""
        seq = self.words[REQUEST_SEQ]
        return seq if seq != handled else 0

    def request_header(self) -> bytes:
        return self._read(REQUEST_AT)

    def answer(self, seq: int, header: bytes) -> int:
        """Publish the reply to request `seq`; the client's state: AWAKE (it polls), WAITING (wake
        it: `wake_client`) or ASLEEP (it sleeps on its socket: send it the reply there too)."""
        self._write(REPLY_AT, header)
        self.words[REPLY_SEQ] = seq
        fence()
        return self.words[CLIENT_STATE]

    def client_state(self) -> int:
        return self.words[CLIENT_STATE]

    def wake_client(self) -> None:
        """Wake a WAITING client: its reply, or news on its socket, is there."""
        if self.reply_address:
            futex_wake(self.reply_address)

    def set_server(self, state: int) -> None:
        self.words[SERVER_STATE] = state
        fence()
