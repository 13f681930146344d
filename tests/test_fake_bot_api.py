"""The fake Bot API server, driven by python-telegram-bot's own ``telegram.Bot`` over loopback HTTP.

If PTB can talk to the fake and gets back what it expects (objects it can parse, the right exception
types), the bot tests that run on top of it exercise the real client code paths.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json

import aiohttp
import pytest
from aiohttp import web
from PIL import Image
from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    LinkPreviewOptions,
    Update,
)
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, Conflict, EndPointNotFound, Forbidden, InvalidToken, NetworkError, RetryAfter

from tests.conftest import make_image
from tests.fake_bot_api import FakeBotAPI, parse_html, parse_markdown_v2

USER = 1001


@pytest.fixture
async def api():
    async with FakeBotAPI() as server:
        yield server


def make_bot(api: FakeBotAPI, token: str | None = None) -> Bot:
    return Bot(token or api.token, base_url=f"{api.root}/bot", base_file_url=f"{api.root}/file/bot")


@pytest.fixture
async def bot(api: FakeBotAPI):
    async with make_bot(api) as b:  # initialize() calls getMe
        yield b


def keyboard(*data: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton(f"b{i}", callback_data=d)] for i, d in enumerate(data)])


def image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


async def test_server_is_loopback_and_get_me_answers(api: FakeBotAPI, bot: Bot) -> None:
    assert api.root.startswith("http://127.0.0.1:")
    me = await bot.get_me()
    assert (me.id, me.username, me.is_bot) == (api.bot_id, "ff_test_bot", True)
    assert bot.username == "ff_test_bot"  # initialize() went through getMe
    assert [c.method for c in api.calls] == ["getMe", "getMe"]


async def test_wrong_token_is_invalid_token(api: FakeBotAPI) -> None:
    with pytest.raises(InvalidToken):
        await make_bot(api, "999:WRONG").get_me()
    assert api.calls[-1].status == 401


async def test_unknown_method_is_404_method_not_found(api: FakeBotAPI, bot: Bot) -> None:
    with pytest.raises(EndPointNotFound):
        await bot.do_api_request("sendTelepathy", api_kwargs={"chat_id": USER})
    assert api.calls[-1].status == 404


async def test_raw_http_error_shapes_json_bodies_and_case_insensitive_methods(api: FakeBotAPI) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api.root}/bot{api.token}/nope") as r:
            assert r.status == 404
            assert await r.json() == {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        async with http.get(f"{api.root}/bot123:BAD/getMe") as r:
            assert (r.status, (await r.json())["error_code"]) == (401, 401)
        async with http.get(f"{api.root}/bot{api.token}/GETME") as r:
            assert (await r.json())["result"]["username"] == "ff_test_bot"
        async with http.post(f"{api.root}/bot{api.token}/sendMessage", data={"chat_id": "5", "text": "x"}) as r:
            assert await r.json() == {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}
        api.add_user(USER)
        api.fail_next("sendMessage", retry_after=3)
        async with http.post(f"{api.root}/bot{api.token}/sendMessage", data={"chat_id": str(USER), "text": "x"}) as r:
            assert r.status == 429
            assert (await r.json())["parameters"] == {"retry_after": 3}
        async with http.post(f"{api.root}/bot{api.token}/sendMessage", json={"chat_id": USER, "text": "hi"}) as r:
            body = await r.json()
            assert body["ok"] and body["result"]["text"] == "hi"
        async with http.post(f"{api.root}/bot{api.token}/sendMessage", data=b"{oops", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400


async def test_send_message_with_keyboard_parse_mode_and_preview(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    sent = await bot.send_message(
        USER, "<b>Top 5</b> for you &amp; me", parse_mode=ParseMode.HTML, reply_markup=keyboard("r:1:+1", "r:1:-1"),
        link_preview_options=LinkPreviewOptions(is_disabled=True),
    )
    assert sent.text == "Top 5 for you & me"
    assert [(e.type, e.offset, e.length) for e in sent.entities] == [("bold", 0, 5)]
    assert sent.reply_markup == keyboard("r:1:+1", "r:1:-1")
    assert sent.chat.id == USER and sent.from_user.id == api.bot_id
    (call,) = api.calls_of("sendMessage", chat_id=USER)
    assert call.params["parse_mode"] == "HTML"
    assert call.params["link_preview_options"] == {"is_disabled": True}
    assert call.params["reply_markup"]["inline_keyboard"][1][0]["callback_data"] == "r:1:-1"
    assert api.messages_to(USER)[0]["message_id"] == sent.message_id


async def test_text_fields_stay_strings(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    sent = await bot.send_message(USER, "42")
    assert sent.text == "42" and api.calls_of("sendMessage")[0].params["text"] == "42"


async def test_send_refusals_match_telegram(api: FakeBotAPI, bot: Bot) -> None:
    with pytest.raises(BadRequest, match="(?i)chat not found"):
        await bot.send_message(USER, "nobody wrote to me")
    api.add_user(USER)
    with pytest.raises(BadRequest, match="(?i)message is too long"):
        await bot.send_message(USER, "x" * 4097)
    with pytest.raises(BadRequest, match="(?i)BUTTON_DATA_INVALID"):
        await bot.send_message(USER, "hi", reply_markup=keyboard("x" * 65))
    with pytest.raises(BadRequest, match="(?i)can't parse entities: Unsupported start tag"):
        await bot.send_message(USER, "H&M <3 <jeans>", parse_mode=ParseMode.HTML)
    with pytest.raises(BadRequest, match=r"(?i)Character '\.' is reserved"):
        await bot.send_message(USER, "Price 9.99", parse_mode=ParseMode.MARKDOWN_V2)
    api.user_blocks_bot(USER)
    with pytest.raises(Forbidden, match="(?i)blocked"):
        await bot.send_message(USER, "hello?")
    assert api.messages_to(USER) == []


def test_entity_parsers_report_utf16_offsets_and_errors() -> None:
    assert parse_html("👍 <i>x</i> &lt;3") == ("👍 x <3", [{"type": "italic", "offset": 3, "length": 1}])
    text, entities = parse_markdown_v2(r"*Shirt* 9\.99 [page](https://shop.example/p?a=1\)) ||s||")
    assert text == "Shirt 9.99 page s"
    assert [e["type"] for e in entities] == ["bold", "text_link", "spoiler"]
    assert entities[1]["url"] == "https://shop.example/p?a=1)"
    with pytest.raises(Exception, match="Can't find end of Bold entity"):
        parse_markdown_v2("*open")
    with pytest.raises(Exception, match='end tag corresponding to start tag "b"'):
        parse_html("<b>open")


async def test_send_photo_upload_then_reuse_by_file_id_and_url(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    jpeg = make_image(3, size=(600, 800))
    first = await bot.send_photo(USER, jpeg, caption="<b>1.</b> Shirt", parse_mode=ParseMode.HTML)
    assert len(first.photo) == 3
    assert (first.photo[-1].width, first.photo[-1].height) == (600, 800)
    assert max(first.photo[0].width, first.photo[0].height) == 90
    assert first.caption == "1. Shirt" and first.caption_entities[0].type == "bold"
    assert len({p.file_id for p in first.photo}) == 3

    again = await bot.send_photo(USER, first.photo[-1].file_id)
    assert again.photo[-1].file_unique_id == first.photo[-1].file_unique_id
    await bot.send_photo(USER, "https://shop.example/img/1.jpg")
    upload, reuse, url = api.calls_of("sendPhoto")
    assert [m.kind for c in (upload, reuse, url) for m in c.media] == ["upload", "file_id", "url"]
    assert upload.files["photo"] == jpeg and upload.media[0].data == jpeg
    assert reuse.media[0].ref == first.photo[-1].file_id and reuse.files == {}
    assert url.media[0].ref == "https://shop.example/img/1.jpg"

    with pytest.raises(BadRequest, match="(?i)wrong file identifier"):
        await bot.send_photo(USER, "AgACAgIAAxkBAAIBnotarealid")
    with pytest.raises(BadRequest, match="(?i)IMAGE_PROCESS_FAILED"):
        await bot.send_photo(USER, b"not a picture at all", filename="x.jpg")
    api.fail_url("https://shop.example/gone.jpg")
    with pytest.raises(BadRequest, match="(?i)failed to get HTTP URL content"):
        await bot.send_photo(USER, "https://shop.example/gone.jpg")
    assert len(api.messages_to(USER)) == 3


async def test_send_media_group_of_five_uploads(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    pictures = [make_image(i, size=(168, 224)) for i in range(5)]
    media = [InputMediaPhoto(p, caption=f"{i + 1}. item") for i, p in enumerate(pictures)]
    messages = await bot.send_media_group(USER, media)
    assert len(messages) == 5
    assert len({m.media_group_id for m in messages}) == 1 and messages[0].media_group_id
    assert [m.caption for m in messages] == [f"{i + 1}. item" for i in range(5)]
    assert len({m.photo[-1].file_id for m in messages}) == 5
    assert len({m.photo[-1].file_unique_id for m in messages}) == 5
    assert [m.message_id for m in messages] == sorted(m.message_id for m in messages)
    (call,) = api.calls_of("sendMediaGroup")
    assert [m.kind for m in call.media] == ["upload"] * 5
    assert sorted(call.files.values()) == sorted(pictures)  # attach:// parts resolved to the uploads
    assert all(item["media"].startswith("attach://") for item in call.params["media"])

    ids = [InputMediaPhoto(m.photo[-1].file_id) for m in messages[:2]]
    reused = await bot.send_media_group(USER, ids)  # cached file_ids work like uploads
    assert [m.photo[-1].file_unique_id for m in reused] == [m.photo[-1].file_unique_id for m in messages[:2]]
    for wrong in (media[:1], media * 3):
        with pytest.raises(BadRequest, match="(?i)number of media"):
            await bot.send_media_group(USER, wrong)


async def test_get_file_downloads_user_photo_and_refuses_big_files(api: FakeBotAPI, bot: Bot) -> None:
    jpeg = make_image(5, size=(400, 300))
    update = Update.de_json(api.user_sends_photo(USER, jpeg), bot)
    photo = update.message.photo
    assert (photo[-1].width, photo[-1].height, photo[-1].file_size) == (400, 300, len(jpeg))
    file = await bot.get_file(photo[-1].file_id)
    assert file.file_size == len(jpeg)
    assert bytes(await file.download_as_bytearray()) == jpeg
    small = await (await bot.get_file(photo[0].file_id)).download_as_bytearray()
    assert image_size(bytes(small)) == (photo[0].width, photo[0].height) == (90, 68)

    big = Update.de_json(api.user_sends_photo(USER, jpeg, file_size=25 * 1024 * 1024), bot)
    with pytest.raises(BadRequest, match="(?i)file is too big"):
        await bot.get_file(big.message.photo[-1].file_id)
    with pytest.raises(BadRequest, match="(?i)invalid file_id"):
        await bot.get_file("nope")
    assert [c.status for c in api.calls_of("download")] == [200, 200]


async def test_get_updates_returns_queued_updates_and_confirms_by_offset(api: FakeBotAPI, bot: Bot) -> None:
    api.user_sends_command(USER, "start")
    api.user_sends_text(USER, "hello", language_code="de")
    api.user_sends_document(USER, b"a,b\n1,2\n", file_name="x.csv", mime_type="text/csv")
    api.user_sends_sticker(USER)
    api.user_sends_photo(USER, make_image(1), media_group_id="g1")
    updates = await bot.get_updates(timeout=0)
    assert [u.update_id for u in updates] == [1, 2, 3, 4, 5]
    start, hello, doc, sticker, photo = (u.message for u in updates)
    assert start.text == "/start" and start.entities[0].type == "bot_command"
    assert hello.from_user.language_code == "de" and hello.chat.type == "private"
    assert (doc.document.file_name, doc.document.mime_type) == ("x.csv", "text/csv")
    assert sticker.sticker is not None and photo.media_group_id == "g1"
    assert len(await bot.get_updates(timeout=0)) == 5  # not confirmed yet
    assert await bot.get_updates(offset=6, timeout=0) == ()
    assert api.pending_updates == []


async def test_long_poll_wakes_on_new_update_and_on_stop(api: FakeBotAPI, bot: Bot) -> None:
    poll = asyncio.create_task(bot.get_updates(timeout=30, read_timeout=40))
    await api.wait_for(lambda a: bool(a.calls_of("getUpdates")))
    api.user_sends_text(USER, "hi")
    updates = await asyncio.wait_for(poll, 10)
    assert updates[0].message.text == "hi"

    poll = asyncio.create_task(bot.get_updates(offset=updates[0].update_id + 1, timeout=30, read_timeout=40))
    await api.wait_for(lambda a: len(a.calls_of("getUpdates")) == 2)
    await asyncio.wait_for(api.stop(), 10)
    assert await asyncio.wait_for(poll, 10) == ()


async def test_second_poller_terminates_the_first(api: FakeBotAPI, bot: Bot) -> None:
    async with make_bot(api) as other:
        first = asyncio.create_task(bot.get_updates(timeout=30, read_timeout=40))
        await api.wait_for(lambda a: bool(a.calls_of("getUpdates")))
        await other.get_updates(timeout=0)
        with pytest.raises(Conflict, match="(?i)terminated by other getUpdates"):
            await asyncio.wait_for(first, 10)


async def test_callback_query_answer_and_keyboard_redraw(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    sent = await bot.send_message(USER, "rate", reply_markup=keyboard("r:7:+1", "r:7:-1"))
    api.user_presses_button(USER, sent.message_id, "r:7:+1")
    (update,) = await bot.get_updates(timeout=0)
    query = update.callback_query
    assert query.data == "r:7:+1" and query.from_user.id == USER
    assert query.message.message_id == sent.message_id and query.message.reply_markup == sent.reply_markup
    assert await bot.answer_callback_query(query.id, text="Saved")
    with pytest.raises(BadRequest, match="(?i)query is too old"):
        await bot.answer_callback_query(query.id)

    redrawn = keyboard("r:7:+1", "r:7:-1")
    redrawn = InlineKeyboardMarkup([[InlineKeyboardButton("✅ 👍", callback_data="r:7:+1")], [*redrawn.inline_keyboard[1]]])
    edited = await bot.edit_message_reply_markup(USER, sent.message_id, reply_markup=redrawn)
    assert edited.reply_markup == redrawn
    assert api.messages_to(USER)[0]["reply_markup"]["inline_keyboard"][0][0]["text"] == "✅ 👍"
    with pytest.raises(BadRequest, match="(?i)message is not modified"):
        await bot.edit_message_reply_markup(USER, sent.message_id, reply_markup=redrawn)
    api.user_presses_button(USER, sent.message_id, "r:7:-1")
    (update,) = await bot.get_updates(offset=update.update_id + 1, timeout=0)
    assert update.callback_query.message.reply_markup == redrawn  # callbacks carry the current keyboard
    with pytest.raises(ValueError, match="inject_update"):
        api.user_presses_button(USER, sent.message_id, "r:999:+1")


async def test_edit_text_and_delete(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    sent = await bot.send_message(USER, "working…", reply_markup=keyboard("x"))
    edited = await bot.edit_message_text("done", USER, sent.message_id)
    assert edited.text == "done" and edited.reply_markup is None and edited.edit_date is not None
    with pytest.raises(BadRequest, match="(?i)message is not modified"):
        await bot.edit_message_text("done", USER, sent.message_id)
    photo = await bot.send_photo(USER, make_image(2))
    with pytest.raises(BadRequest, match="(?i)no text in the message"):
        await bot.edit_message_text("x", USER, photo.message_id)
    assert await bot.delete_message(USER, sent.message_id)
    assert [m["message_id"] for m in api.messages_to(USER)] == [photo.message_id]
    with pytest.raises(BadRequest, match="(?i)message to delete not found"):
        await bot.delete_message(USER, sent.message_id)
    with pytest.raises(BadRequest, match="(?i)message to edit not found"):
        await bot.edit_message_reply_markup(USER, sent.message_id, reply_markup=keyboard("y"))


async def test_forged_callback_via_inject_update(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    sent = await bot.send_message(USER, "rate", reply_markup=keyboard("r:1:+1"))
    forged = {"callback_query": {"id": "42", "from": {"id": 666, "is_bot": False, "first_name": "Eve"},
                                 "chat_instance": "1", "data": "r:1;DROP TABLE", "message": api.message(USER, sent.message_id)}}
    api.inject_update(forged)
    (update,) = await bot.get_updates(timeout=0)
    assert update.callback_query.data == "r:1;DROP TABLE" and update.callback_query.from_user.id == 666
    assert await bot.answer_callback_query("42", text="Not yours")


async def test_injected_message_gives_its_sender_a_chat(api: FakeBotAPI, bot: Bot) -> None:
    api.inject_update({"message": {"message_id": 50, "date": 0, "chat": {"id": 777, "type": "private"},
                                   "from": {"id": 777, "is_bot": False, "first_name": "Raw"}, "text": "hi"}})
    (update,) = await bot.get_updates(timeout=0)
    reply = await update.message.reply_text("hello", do_quote=True)
    assert reply.reply_to_message.message_id == 50 and reply.message_id == 51


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
async def test_fail_next_429_raises_retry_after_then_recovers(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    api.fail_next("sendMessage", retry_after=1)
    with pytest.raises(RetryAfter) as info:
        await bot.send_message(USER, "hi")
    assert info.value.retry_after in (1, dt.timedelta(seconds=1))
    api.fail_next("sendMessage", status=500)
    with pytest.raises(NetworkError):
        await bot.send_message(USER, "hi")
    await bot.send_message(USER, "hi")
    assert [c.status for c in api.calls_of("sendMessage")] == [429, 500, 200]
    assert len(api.messages_to(USER)) == 1


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBUserWarning")
async def test_commands_actions_and_documents(api: FakeBotAPI, bot: Bot) -> None:
    await bot.set_my_commands([("start", "Start"), ("help", "How to use")])
    assert [c.command for c in await bot.get_my_commands()] == ["start", "help"]
    await bot.set_my_commands([("start", "Starten")], language_code="de")
    assert api.commands(language_code="de") == [{"command": "start", "description": "Starten"}]
    with pytest.raises(BadRequest, match="(?i)BOT_COMMAND_INVALID"):
        await bot.set_my_commands([("Bad-Command", "x")])
    await bot.delete_my_commands()
    assert await bot.get_my_commands() == ()

    api.add_user(USER)
    assert await bot.send_chat_action(USER, ChatAction.UPLOAD_PHOTO)
    with pytest.raises(BadRequest, match="(?i)wrong parameter action"):
        await bot.do_api_request("sendChatAction", api_kwargs={"chat_id": USER, "action": "dancing"})
    doc = await bot.send_document(USER, b"id,score\n1,0.5\n", filename="feedback.csv", caption="export")
    assert (doc.document.file_name, doc.caption) == ("feedback.csv", "export")
    assert api.calls_of("sendDocument")[0].files["document"] == b"id,score\n1,0.5\n"
    got = await (await bot.get_file(doc.document.file_id)).download_as_bytearray()
    assert bytes(got) == b"id,score\n1,0.5\n"


async def test_webhook_delivery_and_conflict_with_polling(api: FakeBotAPI, bot: Bot) -> None:
    received: list[tuple[dict, str | None]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.json(), request.headers.get("X-Telegram-Bot-Api-Secret-Token")))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        with pytest.raises(BadRequest, match="(?i)HTTPS URL must be provided"):
            await bot.set_webhook("http://shop.example/hook")
        assert await bot.set_webhook(url, secret_token="s3cret")
        assert (await bot.get_webhook_info()).url == url
        api.user_sends_text(USER, "via webhook")
        await api.wait_for(lambda a: bool(received))
        assert received[0][0]["message"]["text"] == "via webhook" and received[0][1] == "s3cret"
        await api.wait_for(lambda a: not a.pending_updates)
        with pytest.raises(Conflict, match="(?i)webhook is active"):
            await bot.get_updates(timeout=0)
        assert await bot.delete_webhook()
        assert (await bot.get_webhook_info()).url == ""
        api.user_sends_text(USER, "via polling")
        (update,) = await bot.get_updates(timeout=0)
        assert update.message.text == "via polling"
    finally:
        await runner.cleanup()


async def test_wait_for_times_out_with_a_summary(api: FakeBotAPI, bot: Bot) -> None:
    api.add_user(USER)
    await bot.send_message(USER, "only this")
    with pytest.raises(TimeoutError, match="sendMessage chat=1001.*only this"):
        await api.wait_for(lambda a: len(a.messages_to(USER)) == 2, timeout=0.2)


async def test_user_photo_that_is_no_picture_is_still_delivered(api: FakeBotAPI, bot: Bot) -> None:
    update = Update.de_json(api.user_sends_photo(USER, b"\xff\xd8 truncated jpeg"), bot)
    assert len(update.message.photo) == 3
    got = await (await bot.get_file(update.message.photo[-1].file_id)).download_as_bytearray()
    assert bytes(got) == b"\xff\xd8 truncated jpeg"  # the bot's own checks must refuse it


def test_updates_are_json_serialisable_and_use_telegram_field_names() -> None:
    api = FakeBotAPI()
    update = api.user_sends_photo(USER, make_image(0))
    assert json.loads(json.dumps(update)) == update
    message = update["message"]
    assert {"message_id", "date", "chat", "from", "photo"} <= message.keys()
    assert message["chat"] == {"id": USER, "type": "private", "first_name": f"User{USER}"}
    assert all({"file_id", "file_unique_id", "width", "height", "file_size"} <= p.keys() for p in message["photo"])


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
async def test_unmodified_ptb_application_polls_replies_and_stops(api: FakeBotAPI) -> None:
    """A real ``Application`` (polling, rate limiter with retries) runs against the fake end to end."""
    from telegram.ext import AIORateLimiter, ApplicationBuilder, CallbackQueryHandler, CommandHandler, MessageHandler, filters

    async def start(update: Update, context) -> None:
        await update.message.reply_text("Send me a photo", reply_markup=keyboard("r:1:+1"))

    async def photo(update: Update, context) -> None:
        file = await update.message.photo[-1].get_file()
        data = await file.download_as_bytearray()
        await update.message.reply_text(f"got {len(data)} bytes")

    async def rate(update: Update, context) -> None:
        await update.callback_query.answer("Saved")
        await update.callback_query.edit_message_reply_markup(keyboard("r:1:+1", "r:1:-1"))

    app = (
        ApplicationBuilder().token(api.token).base_url(f"{api.root}/bot").base_file_url(f"{api.root}/file/bot")
        .rate_limiter(AIORateLimiter(max_retries=1)).build()
    )
    app.add_handler(CommandHandler("start", start))
    app.add_handler(MessageHandler(filters.PHOTO, photo))
    app.add_handler(CallbackQueryHandler(rate))
    jpeg = make_image(9)
    async with app:
        await app.start()
        await app.updater.start_polling(poll_interval=0.0, timeout=5)
        api.fail_next("sendMessage", retry_after=1)  # the rate limiter waits and retries once
        api.user_sends_command(USER, "start")
        await api.wait_for(lambda a: len(a.messages_to(USER)) == 1, timeout=15)
        api.user_sends_photo(USER, jpeg)
        await api.wait_for(lambda a: len(a.messages_to(USER)) == 2, timeout=15)
        first = api.messages_to(USER)[0]
        api.user_presses_button(USER, first["message_id"], "r:1:+1")
        await api.wait_for(lambda a: len(a.message(USER, first["message_id"])["reply_markup"]["inline_keyboard"]) == 2, timeout=15)
        await app.updater.stop()
        await app.stop()
    assert [c.status for c in api.calls_of("sendMessage")] == [429, 200, 200]
    assert api.messages_to(USER)[1]["text"] == f"got {len(jpeg)} bytes"
    assert [c.ok for c in api.calls_of("answerCallbackQuery")] == [True]
    assert api.calls_of("deleteWebhook")  # polling bootstrap
    assert api.pending_updates == []  # everything processed was confirmed on shutdown
