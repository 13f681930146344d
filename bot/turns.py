"""Each user's updates being handled, in the order this process received them.

An erase (/forget) must not overlap the user's other updates: one received before it may still
be writing (a search being logged, a rating, a "more like this"), and its rows would outlive the
"erased" answer; one received after it must see the erase done. So :mod:`bot.updates` enters
every update here when it starts, synchronously (before its first ``await``, so the order is
the order of arrival), and leaves it when its handlers are done. An *exclusive* update waits
for every earlier one of its user; the others wait only for an earlier exclusive one.

This orders one process's updates: the design chosen, since Telegram delivers a user's
updates to one webhook in order and one replica handles nearly all of them. Across replicas
on one database the writes themselves are ordered (an erase, a rating and a search being
logged lock the user's row first, :func:`ffengine.db.store.lock_user`), so nothing deadlocks
and a rating or a button's search that comes after another replica's erase is refused (its
rows are gone). A photo search of an update received before another replica's /forget, and
logged after it, is refused by the note the erase leaves (:class:`ffengine.db.models.Erasure`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Turn:
    """One update of a user, set ``done`` when it leaves."""

    update_id: int
    exclusive: bool
    done: asyncio.Event = field(default_factory=asyncio.Event)


class UserTurns:
    """Per user, the updates started and not yet finished, oldest first."""

    def __init__(self) -> None:
        self._turns: dict[int, list[Turn]] = {}

    def enter(self, user_id: int, update_id: int, *, exclusive: bool) -> None:
        """The update has started (call before any ``await`` in its handling)."""
        self._turns.setdefault(user_id, []).append(Turn(update_id, exclusive))

    def leave(self, user_id: int, update_id: int) -> None:
        """The update is done (or dropped): whatever waits for it goes on."""
        turns = self._turns.get(user_id, [])
        for turn in [t for t in turns if t.update_id == update_id]:
            turns.remove(turn)
            turn.done.set()
        if not turns:
            self._turns.pop(user_id, None)

    async def wait(self, user_id: int, update_id: int, timeout: float) -> bool:
        """Wait until the update may go on: the earlier updates it must not overlap are done.

        False when they are still running after ``timeout`` seconds (the update was never
        entered, or already left: True at once).
        """
        turns = self._turns.get(user_id, [])
        mine = next((n for n, t in enumerate(turns) if t.update_id == update_id), None)
        if mine is None:
            return True
        exclusive = turns[mine].exclusive
        earlier = [t.done.wait() for t in turns[:mine] if exclusive or t.exclusive]
        if not earlier:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*earlier), timeout)
        except TimeoutError:
            return False
        return True
