"""Exactly-once updates: each Telegram update is handled by one replica, once.

Telegram delivers a webhook update again when it got no answer: the replica was slow, or died
while handling it (the webhook answers once the update's handlers are done, see
:mod:`bot.webhook`). So before any handler runs, the replica claims the update's id in the
database (:func:`claim`, a ``TypeHandler`` in :data:`CLAIM_GROUP`, ahead of every other group),
and marks it finished when they are done (:func:`finish`, in :data:`FINISH_GROUP`, after them).
A delivery that meets a claim is

- dropped when the update is finished, or still being handled by this process;
- held while a live replica handles it, until that one finishes (dropped) or dies;
- handled when its claimer died (no heartbeat for ``BOT_SYNC_INTERVAL`` x 5, or it stopped), or
  was this replica's previous run (same ``BOT_REPLICA_NAME``): taken over.

The same two handlers serve polling, where a restart fetches again the updates it had not
confirmed. If the database cannot be reached the update is handled anyway: its own writes say
so, and a duplicate is better than a lost search.

The claim also enters the update in its user's turns (:mod:`bot.turns`) before its first
``await``, and the finish leaves them: a /forget then waits for the user's updates received
before it, and those received after it wait for the /forget (here, once claimed).
"""

from __future__ import annotations

import asyncio
import logging

from telegram import Update
from telegram.ext import ApplicationHandlerStop, BaseHandler, TypeHandler

from bot.context import BotServices, FFContext
from bot.handlers.privacy import erases

log = logging.getLogger(__name__)
CLAIM_GROUP = -1  # before every handler (they are in group 0)
FINISH_GROUP = 1  # after them (PTB runs a later group even when an earlier one raised)
WAIT_POLL_S = 0.25
#: Hold a re-delivery at most this long for the live replica handling it, then drop it.
MAX_WAIT_S = 60.0


async def claim(update: object, context: FFContext) -> None:
    """Group -1: stop here unless this replica is the one to handle ``update``; then wait for an
    earlier /forget of its user."""
    if not isinstance(update, Update):
        return
    svc, update_id, user = context.services, update.update_id, update.effective_user
    if update_id in svc.handling:
        log.info("update %d delivered again while this replica handles it: dropped", update_id)
        raise ApplicationHandlerStop
    svc.handling.add(update_id)
    exclusive = erases(update)
    if user is not None:
        svc.turns.enter(user.id, update_id, exclusive=exclusive)  # before any await: in the order received
    try:
        mine = await claimed(svc, update_id)
    except Exception:  # database down: handling twice beats not at all
        log.warning("could not claim update %d; handling it unclaimed", update_id, exc_info=True)
        mine = True
    if not mine:
        release(svc, update)
        log.info("update %d delivered again; another delivery was handled: dropped", update_id)
        raise ApplicationHandlerStop
    if user is not None and not exclusive and not await svc.turns.wait(user.id, update_id, MAX_WAIT_S):
        log.warning("update %d: an earlier /forget of its user is still running; handling it anyway", update_id)


async def claimed(svc: BotServices, update_id: int) -> bool:
    """Whether this replica is to handle the update, waiting while another live replica handles it."""
    me, loop = svc.replicas.name, asyncio.get_running_loop()
    deadline = loop.time() + MAX_WAIT_S
    claim = await svc.db.claim_update(update_id, me)
    while not claim.mine:
        if claim.finished:
            return False
        if claim.replica != me and await svc.replicas.alive(claim.replica):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(WAIT_POLL_S)
        elif await svc.db.take_over_update(update_id, me, claim.replica):  # it died (or was this replica's previous run)
            log.warning("update %d: taking it over from replica %s, which stopped before finishing it", update_id, claim.replica)
            return True
        claim = await svc.db.claim_update(update_id, me)
    return True


async def finish(update: object, context: FFContext) -> None:
    """Last group: the handlers are done with ``update``; a later delivery is dropped."""
    svc = context.services
    if not isinstance(update, Update) or update.update_id not in svc.handling:
        return
    try:
        await svc.db.finish_update(update.update_id)
    except Exception:  # only a re-delivery's takeover depends on it
        log.warning("could not mark update %d finished", update.update_id, exc_info=True)
    finally:
        release(svc, update)


def release(svc: BotServices, update: Update) -> None:
    """This process is done with ``update``: forget its claim and end its user's turn."""
    svc.handling.discard(update.update_id)
    if update.effective_user is not None:
        svc.turns.leave(update.effective_user.id, update.update_id)


def handlers() -> dict[int, list[BaseHandler]]:
    """Handler groups for ``Application.add_handlers``."""
    return {CLAIM_GROUP: [TypeHandler(Update, claim)], FINISH_GROUP: [TypeHandler(Update, finish)]}
