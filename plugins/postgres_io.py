"""Socket I/O for the PostgreSQL relay's hot path, with as few trips through trio's scheduler as
possible.

``trio.SocketStream.receive_some``/``send_all`` pass through the scheduler on every call, even when
the socket is ready: a checkpoint before and a yield after each operation. A query round trip
through the relay is four socket operations, so that overhead alone costs more than everything
else the relay does per statement. :class:`Channel` reads and writes a plain TCP socket's file
descriptor directly (``os.read``/``os.write`` on the non-blocking descriptor trio already
manages) and only waits (``trio.lowlevel.wait_readable``/``wait_writable``, which are checkpoints)
when the socket is not ready. To stay fair to other tasks and to notice cancellation, every
:data:`YIELD_EVERY`-th operation that did not have to wait yields anyway.

A TLS stream (``trio.SSLStream``) has no such shortcut: the channel then uses the stream's own
methods. Errors are turned into trio's: a peer that reset or closed the connection is
``trio.BrokenResourceError``.

Only one task may write through a channel at a time: :class:`Gate` serialises writers without a
checkpoint when nobody else holds it (``trio.Lock`` always checkpoints).
"""

from __future__ import annotations

import errno
import os

import trio

# Operations in a row that found the socket ready before the channel yields to the scheduler
# anyway: a busy connection must not starve the other sessions (nor miss a cancellation).
YIELD_EVERY = 16

_BROKEN = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED, errno.ESHUTDOWN, errno.EBADF)


class Channel:
    __slots__ = ("stream", "fd", "_ready_ops", "_drained")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.fd = stream.socket.fileno() if type(stream) is trio.SocketStream else None
        self._ready_ops = 0
        # the last read returned less than asked: the socket is most likely empty now, so the
        # next read waits for readiness first instead of paying for a read that finds nothing
        self._drained = False

    async def receive(self, max_bytes: int) -> bytes:
        """Some bytes, or ``b""`` when the peer closed the connection."""
        fd = self.fd
        if fd is None:
            return await self.stream.receive_some(max_bytes)
        if self._drained:
            self._ready_ops = 0
            await _wait(trio.lowlevel.wait_readable, fd)
        while True:
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                self._ready_ops = 0
                await _wait(trio.lowlevel.wait_readable, fd)
                continue
            except OSError as exc:
                if exc.errno == errno.ECONNRESET:
                    return b""  # a reset is the end of the stream, as trio reports it
                raise _broken(exc) from None
            self._drained = len(data) < max_bytes
            if not self._drained:
                await self._maybe_yield()  # a full read: more may follow, stay fair meanwhile
            return data

    async def send_all(self, data: bytes) -> None:
        fd = self.fd
        if fd is None:
            await self.stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                self._ready_ops = 0
                await _wait(trio.lowlevel.wait_writable, fd)
                continue
            except OSError as exc:
                raise _broken(exc) from None
            view = view[sent:]
        await self._maybe_yield()

    async def _maybe_yield(self) -> None:
        self._ready_ops += 1
        if self._ready_ops >= YIELD_EVERY:
            self._ready_ops = 0
            await trio.lowlevel.checkpoint()


async def _wait(waiter, fd: int) -> None:
    try:
        await waiter(fd)
    except trio.ClosedResourceError:
        raise
    except OSError as exc:
        raise _broken(exc) from None


def _broken(exc: OSError) -> Exception:
    if exc.errno in _BROKEN:
        return trio.BrokenResourceError(f"connection lost ({errno.errorcode.get(exc.errno, exc.errno)})")
    return exc


class Gate:
    """A writers' lock that costs nothing when it is free."""

    __slots__ = ("busy", "_waiters")

    def __init__(self) -> None:
        self.busy = False
        self._waiters: list[trio.Event] = []

    async def __aenter__(self) -> None:
        while self.busy:
            event = trio.Event()
            self._waiters.append(event)
            await event.wait()
        self.busy = True

    async def __aexit__(self, *exc: object) -> None:
        self.busy = False
        if self._waiters:  # wake them all: one takes the gate, the others wait again
            waiters, self._waiters = self._waiters, []
            for event in waiters:
                event.set()
