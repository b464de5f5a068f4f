"""A mutex that costs almost nothing until two tasks want it at once.

relayd holds thousands of idle agent connections, each of which needs a few
mutexes (one writer at a time on the socket, Hypercorn's idle timer), and a
``trio.Lock`` with its parking lot is most of a kilobyte apiece. A
:class:`LeanLock` is a flag; its parking lot is made on the first contention.
"""

from __future__ import annotations

from types import TracebackType

import trio

__all__ = ["LeanLock"]


class LeanLock:
    """A non-reentrant mutex for ``async with``, like ``trio.Lock`` (unfair on release)."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot: trio.lowlevel.ParkingLot | None = None

    @property
    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._held:
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
            try:
                await self._lot.park()
            except BaseException:
                # We may have been woken and cancelled at once: pass the wake-up on.
                if not self._held and self._lot:
                    self._lot.unpark()
                raise
        self._held = True

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._held = False
        if self._lot:
            self._lot.unpark()
