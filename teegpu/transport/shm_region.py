"""The shared-memory data plane: one plain file under /dev/shm per client, mapped MAP_SHARED.

The client creates the file, writes request tensors into it and sends only the header
over ZeroMQ; the server maps the same file by name and writes its reply after the
request. Plain files directly under /dev/shm, opened and mmapped MAP_SHARED, are what
Gramine's `untrusted_shm` mount lets an enclave share with the host, so the same code
runs inside SGX. Everything in the region is visible to (and writable by) the server:
the client copies each reply out before it uses it.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import secrets

import torch

from teegpu.errors import ConfigError, ProtocolError
from teegpu.protocol import ErrorCode
from teegpu.transport.doorbell import Doorbell

SHM_DIR = "/dev/shm"
NAME_PATTERN = re.compile(r"teegpu-[A-Za-z0-9_-]{1,64}\Z")
MIN_BYTES = 1 << 13  # the doorbell page and at least one page of tensors
MAX_BYTES = 1 << 34
MAX_VIEWS = 256  # tensor views kept per region (prefill chunks make many shapes; decode few)
DEFAULT_BYTES = 64 << 20  # a 512-token prefill of SmolLM2 needs < 8 MB; larger messages go inline


class ShmRegion:
    """A mapped file under SHM_DIR and a byte tensor over all of it."""

    def __init__(self, name: str, fd: int, size: int, owner: bool):
        self.name, self.size, self.owner = name, size, owner  # owner: created it and its name still exists
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)
        with torch.inference_mode(False):  # views are reused inside and outside inference mode
            self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._views: dict = {}
        self.doorbell = Doorbell(self._map)

    @classmethod
    def create(cls, size: int = DEFAULT_BYTES) -> "ShmRegion":
        """A fresh region only this user can open (the client's side)."""
        if not MIN_BYTES <= size <= MAX_BYTES:
            raise ConfigError(f"shared region of {size} bytes: choose {MIN_BYTES}..{MAX_BYTES}")
        name = f"teegpu-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(os.path.join(SHM_DIR, name))
            raise
        return cls(name, fd, size, owner=True)

    @classmethod
    def attach(cls, name: str) -> "ShmRegion":
        """Map a client's region by name (the server's side); raise ProtocolError (BAD_SHM) naming the problem."""
        if not NAME_PATTERN.match(name):
            raise ProtocolError(ErrorCode.BAD_SHM, f"shared region name {name!r} is not of the form teegpu-NAME directly under {SHM_DIR}")
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise ProtocolError(ErrorCode.BAD_SHM, f"cannot open {SHM_DIR}/{name}: {e.strerror} (is the client on another host?)") from e
        size = os.fstat(fd).st_size
        if not MIN_BYTES <= size <= MAX_BYTES:
            os.close(fd)
            raise ProtocolError(ErrorCode.BAD_SHM, f"{SHM_DIR}/{name} holds {size} bytes, outside {MIN_BYTES}..{MAX_BYTES}")
        return cls(name, fd, size, owner=False)

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A view of the region (no copy); offset must be aligned to the dtype. Views are kept for
        reuse: a decode step asks for the same few again and again, and making one costs microseconds."""
        key = (offset, dtype, tuple(shape))
        view = self._views.get(key)
        if view is None:
            n = dtype.itemsize * math.prod(shape)
            if offset < 0 or offset + n > self.size:
                raise ProtocolError(ErrorCode.BAD_SHM, f"{n} bytes at offset {offset} exceed the shared region "
                                    f"of {self.size}")
            if len(self._views) >= MAX_VIEWS:
                self._views.clear()
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                view = self._views[key] = self.bytes[offset:offset + n].view(dtype).view(shape)
        return view

    def holds(self, t: torch.Tensor) -> bool:
        """Whether tensor t lies in this region (and so can change under the reader)."""
        if self.bytes is None:
            return False
        start = self.bytes.data_ptr()
        return start <= t.data_ptr() < start + self.size

    def unlink(self) -> bool:
        """Remove the name (the creating side, once the server has mapped it): the memory then lives
        exactly as long as the two mappings, so a killed process leaves nothing in /dev/shm."""
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
            except OSError:
                return False  # a mount that cannot unlink while mapped: removed at close instead
            self.owner = False
        return True

    def close(self) -> None:
        """Unmap (once no view is left) and, on the creating side, remove the file if still named."""
        self.bytes = None
        self._views.clear()
        self.doorbell.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with it
        self.unlink()
