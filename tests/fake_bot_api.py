"""A fake Telegram Bot API server on 127.0.0.1 for running the unmodified bot in tests.

The bot is pointed at :attr:`FakeBotAPI.root` (``TELEGRAM_API_URL``) and talks real HTTP to it, so
python-telegram-bot's own request layer (httpx, form fields, multipart uploads, ``attach://``) is
exercised. Tests play the users (``user_sends_*``, ``user_presses_button``), read what the bot did
(:attr:`FakeBotAPI.calls`, :meth:`FakeBotAPI.messages_to`) and inject faults (:meth:`FakeBotAPI.fail_next`).

The fake is strict where the real API is strict and bots commonly break: unknown chats, blocked users,
text/caption length, inline keyboards (``callback_data`` <= 64 bytes; link buttons only to public
http(s) hosts, not localhost / internal names / private addresses / very long URLs), HTML / MarkdownV2 entity
parsing, "message is not modified" on identical edits, double-answered callback queries, unknown
``file_id`` values, undecodable photo uploads, media groups of 2..10 items and ``getFile`` on files
over 20 MB. Error texts copy the real ones where known; a few are close approximations.

Deliberate deviations: webhooks may use plain ``http://`` to a loopback host (the real API demands
HTTPS) and the fake never downloads URLs the bot sends (``serve_url``/``fail_url`` decide what they are).
For several bot replicas behind a load balancer, the fake plays the balancer too (:meth:`FakeBotAPI.balance`),
and :meth:`FakeBotAPI.post_update` re-delivers an update to a chosen replica.
Use it from the event loop that started it.
"""

from __future__ import annotations

import asyncio
import copy
import io
import ipaddress
import json
import re
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from PIL import Image

JSON = dict[str, Any]

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024  # getFile refuses bigger files
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_PHOTO_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_CALLBACK_DATA_BYTES = 64
MAX_BUTTON_URL = 2048  # an approximation: Telegram refuses very long button URLs but documents no limit
MAX_LONG_POLL_S = 50.0
WEBHOOK_TIMEOUT_S = 60.0  # a webhook that answers later is tried again
MAX_DECODE_PIXELS = 40_000_000
PHOTO_SIDES = (90, 320)  # the two downscaled PhotoSize entries; the third is the upload itself
CHAT_ACTIONS = frozenset(
    "typing upload_photo record_video upload_video record_voice upload_voice upload_document "
    "choose_sticker find_location record_video_note upload_video_note".split()
)
# Update types delivered when allowed_updates was never set or set to [].
DEFAULT_EXCLUDED_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
# Form fields that are plain strings: never JSON-decode them ("42" must stay text, not an int).
STRING_FIELDS = frozenset(
    "text caption parse_mode photo document sticker video audio animation voice thumbnail file_id "
    "callback_query_id inline_message_id url action secret_token ip_address language_code emoji "
    "business_connection_id message_effect_id name description short_description title".split()
)
NOT_MODIFIED = (
    "message is not modified: specified new message content and reply markup are exactly "
    "the same as a current content and reply markup of the message"
)
QUERY_INVALID = "query is too old and response timeout expired or query ID is invalid"
WRONG_FILE = "wrong file identifier/HTTP URL specified"
BUTTON_KINDS = (
    "url", "callback_data", "web_app", "login_url", "switch_inline_query", "switch_inline_query_current_chat",
    "switch_inline_query_chosen_chat", "copy_text", "callback_game", "pay",
)


class ApiError(Exception):
    """An error answer: HTTP status = ``error_code``, ``description`` as the real API words it."""

    def __init__(self, status: int, description: str, parameters: JSON | None = None) -> None:
        super().__init__(description)
        self.status, self.description, self.parameters = status, description, parameters

    def body(self) -> JSON:
        out: JSON = {"ok": False, "error_code": self.status, "description": self.description}
        if self.parameters:
            out["parameters"] = self.parameters
        return out


def bad_request(what: str) -> ApiError:
    return ApiError(400, f"Bad Request: {what}")


@dataclass(frozen=True)
class Media:
    """One file the bot sent: how it referenced it (upload, an existing file_id, or a URL)."""

    kind: Literal["upload", "file_id", "url"]
    ref: str  # multipart part name, file_id or URL
    data: bytes | None = None  # the uploaded bytes
    filename: str | None = None


@dataclass
class Call:
    """One HTTP request the bot made, in arrival order (``time`` is ``time.monotonic()``)."""

    method: str  # canonical spelling ("sendMessage") for known methods, as requested otherwise
    params: JSON  # form/JSON fields, JSON-decoded except plain-string fields such as text
    files: dict[str, bytes]  # multipart uploads by part name
    time: float
    status: int = 200  # HTTP status answered (set when the answer is sent)
    media: list[Media] = field(default_factory=list)
    result: Any = None  # the ``result`` returned, or the error description

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class StoredFile:
    file_id: str
    file_unique_id: str
    kind: str  # photo | document | sticker
    data: bytes
    file_size: int
    file_path: str
    mime_type: str = "application/octet-stream"
    photo: list[JSON] | None = None  # all PhotoSize entries of the photo this size belongs to
    document: JSON | None = None


@dataclass
class ChatState:
    chat: JSON
    next_message_id: int = 1
    blocked: bool = False
    messages: dict[int, JSON] = field(default_factory=dict)  # every live message, users' and bot's


def _u16(text: str) -> int:
    """Length in UTF-16 code units, the unit of Telegram entity offsets and limits."""
    return len(text.encode("utf-16-le")) // 2


def _jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _check_button_url(url: str) -> None:
    """Telegram's checks on an inline button's ``url``: http(s) or tg:, and a public host."""
    if not re.match(r"(https?|tg)://[^\s]+$", url):
        raise bad_request(f"inline keyboard button URL '{url}' is invalid: Wrong HTTP URL")
    if url.startswith("tg://"):
        return
    host = (urlsplit(url).hostname or "").rstrip(".")
    try:
        internal = not ipaddress.ip_address(host).is_global
    except ValueError:
        internal = "." not in host or host.endswith((".localhost", ".local", ".internal"))
    if internal or len(url) > MAX_BUTTON_URL:
        raise bad_request("BUTTON_URL_INVALID")


# ----------------------------------------------------------------------------------------------
# parse_mode: text with markup -> (plain text, entities), raising the real API's parse errors


class _Entities:
    """Builds plain text and MessageEntity dicts with UTF-16 offsets."""

    def __init__(self, src: str) -> None:
        self.src, self.out, self.pos, self.entities = src, [], 0, []

    def emit(self, text: str) -> None:
        self.out.append(text)
        self.pos += _u16(text)

    def add(self, kind: str, start: int, **extra: Any) -> None:
        if self.pos > start:
            self.entities.append({"type": kind, "offset": start, "length": self.pos - start, **extra})

    def byte_offset(self, i: int) -> int:
        return len(self.src[:i].encode())

    def fail(self, what: str) -> ApiError:
        return bad_request(f"can't parse entities: {what}")

    def result(self) -> tuple[str, list[JSON]]:
        self.entities.sort(key=lambda e: (e["offset"], -e["length"]))
        return "".join(self.out), self.entities


_HTML_TAGS = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline", "ins": "underline",
    "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough", "span": "spoiler",
    "tg-spoiler": "spoiler", "a": "text_link", "code": "code", "pre": "pre", "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}
_HTML_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_HTML_ATTR = re.compile(r"""([a-zA-Z-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")
_HTML_ENTITY = re.compile(r"&(#x[0-9a-fA-F]{1,6}|#[0-9]{1,7}|[a-zA-Z]+);")


def _unescape_html(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name.startswith("#x"):
            return chr(int(name[2:], 16))
        if name.startswith("#"):
            return chr(int(name[1:]))
        return _HTML_NAMED.get(name, m.group(0))

    return _HTML_ENTITY.sub(sub, text)


def parse_html(src: str) -> tuple[str, list[JSON]]:
    """Telegram's HTML style: only its tags; every other ``<`` must be written ``&lt;``."""
    b = _Entities(src)
    stack: list[tuple[str, int, int, JSON]] = []  # tag, start, byte offset, attributes
    i = 0
    while i < len(src):
        c = src[i]
        if c == "&":
            m = _HTML_ENTITY.match(src, i)
            if m and (m.group(1).startswith("#") or m.group(1) in _HTML_NAMED):
                b.emit(_unescape_html(m.group(0)))
                i = m.end()
            else:
                b.emit("&")
                i += 1
            continue
        if c != "<":
            b.emit(c)
            i += 1
            continue
        end = src.find(">", i)
        if end < 0:
            raise b.fail(f"Unclosed start tag at byte offset {b.byte_offset(i)}")
        body = src[i + 1 : end]
        if body.startswith("/"):
            name = body[1:].strip().lower()
            if not stack:
                raise b.fail(f'Unexpected end tag at byte offset {b.byte_offset(i)}')
            tag, start, _, attrs = stack.pop()
            if name and name != tag:
                raise b.fail(f'Can\'t find end tag corresponding to start tag "{tag}"')
            kind = _HTML_TAGS[tag]
            if kind == "code" and stack and stack[-1][0] == "pre":
                lang = attrs.get("class", "").removeprefix("language-")
                if lang:
                    stack[-1][3]["language"] = lang
            elif kind == "text_link":
                b.add(kind, start, url=attrs["href"])
            elif kind == "custom_emoji":
                b.add(kind, start, custom_emoji_id=attrs.get("emoji-id", ""))
            elif kind == "pre" and attrs.get("language"):
                b.add(kind, start, language=attrs["language"])
            else:
                b.add(kind, start)
        else:
            m = re.match(r"([a-zA-Z][a-zA-Z0-9-]*)", body)
            name = m.group(1).lower() if m else ""
            attrs = {a.lower(): _unescape_html(next(v for v in vals if v is not None)) for a, *vals in _HTML_ATTR.findall(body)}
            if name not in _HTML_TAGS or (name == "span" and attrs.get("class") != "tg-spoiler"):
                raise b.fail(f'Unsupported start tag "{name or body[:10]}" at byte offset {b.byte_offset(i)}')
            if name == "a" and "href" not in attrs:
                raise b.fail(f"Can't find end of a tag with href at byte offset {b.byte_offset(i)}")
            stack.append((name, b.pos, b.byte_offset(i), attrs))
        i = end + 1
    if stack:
        raise b.fail(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return b.result()


_MD2_RESERVED = frozenset("_*[]()~`>#+-=|{}.!")
_MD2_MARKERS = {"*": "bold", "_": "italic", "__": "underline", "~": "strikethrough", "||": "spoiler"}
_ENTITY_NAMES = {
    "bold": "Bold", "italic": "Italic", "underline": "Underline", "strikethrough": "Strikethrough",
    "spoiler": "Spoiler", "text_link": "TextUrl", "code": "Code", "pre": "Pre",
}


def _find_unescaped(src: str, token: str, start: int) -> int:
    i = start
    while i < len(src):
        if src[i] == "\\":
            i += 2
        elif src.startswith(token, i):
            return i
        else:
            i += 1
    return -1


def _unescape_md(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text, flags=re.S)


def parse_markdown_v2(src: str) -> tuple[str, list[JSON]]:
    """MarkdownV2: every reserved character outside markup must be escaped with ``\\``."""
    b = _Entities(src)
    stack: list[tuple[str, int, int]] = []  # kind, start, byte offset
    quote_start: int | None = None
    i = 0
    while i < len(src):
        c = src[i]
        if c == "\\":
            if i + 1 < len(src) and 1 <= ord(src[i + 1]) <= 126:
                b.emit(src[i + 1])
                i += 2
                continue
            raise b.fail("Character '\\' is reserved and must be escaped with the preceding '\\'")
        if c == "`":
            token = "```" if src.startswith("```", i) else "`"
            end = _find_unescaped(src, token, i + len(token))
            if end < 0:
                kind = "Pre" if token == "```" else "Code"
                raise b.fail(f"Can't find end of {kind} entity at byte offset {b.byte_offset(i)}")
            inner = src[i + len(token) : end]
            extra: JSON = {}
            if token == "```":
                first, nl, rest = inner.partition("\n")
                if nl and first and " " not in first:
                    extra["language"], inner = first, rest
            start = b.pos
            b.emit(_unescape_md(inner))
            b.add("pre" if token == "```" else "code", start, **extra)
            i = end + len(token)
            continue
        marker = next((m for m in ("||", "__", "*", "_", "~") if src.startswith(m, i)), None)
        if marker is not None:
            kind = _MD2_MARKERS[marker]
            if stack and stack[-1][0] == kind:
                _, start, _ = stack.pop()
                b.add(kind, start)
            elif any(s[0] == kind for s in stack):
                raise b.fail(f"Can't find end of {_ENTITY_NAMES[stack[-1][0]]} entity at byte offset {stack[-1][2]}")
            else:
                stack.append((kind, b.pos, b.byte_offset(i)))
            i += len(marker)
            continue
        if c == "[":
            stack.append(("text_link", b.pos, b.byte_offset(i)))
            i += 1
            continue
        if c == "]" and stack and stack[-1][0] == "text_link" and src.startswith("(", i + 1):
            end = _find_unescaped(src, ")", i + 2)
            if end < 0:
                raise b.fail(f"Can't find end of a URL at byte offset {b.byte_offset(i + 1)}")
            _, start, _ = stack.pop()
            b.add("text_link", start, url=_unescape_md(src[i + 2 : end]))
            i = end + 1
            continue
        if c == ">" and (i == 0 or src[i - 1] == "\n") and quote_start is None:
            quote_start = b.pos
            i += 1
            continue
        if c in _MD2_RESERVED:
            raise b.fail(f"Character '{c}' is reserved and must be escaped with the preceding '\\'")
        if c == "\n" and quote_start is not None and not src.startswith(">", i + 1):
            b.add("blockquote", quote_start)
            quote_start = None
        b.emit(c)
        i += 1
    if quote_start is not None:
        b.add("blockquote", quote_start)
    if stack:
        kind, _, offset = stack[-1]
        raise b.fail(f"Can't find end of {_ENTITY_NAMES[kind]} entity at byte offset {offset}")
    return b.result()


def parse_markdown(src: str) -> tuple[str, list[JSON]]:
    """Legacy Markdown: ``*bold*``, ``_italic_``, ``code``, ``pre``, ``[text](url)``; no nesting."""
    b = _Entities(src)
    i = 0
    while i < len(src):
        c = src[i]
        if c == "\\" and i + 1 < len(src) and src[i + 1] in "_*`[":
            b.emit(src[i + 1])
            i += 2
        elif c in "*_`":
            token = "```" if src.startswith("```", i) else c
            end = src.find(token, i + len(token))
            if end < 0:
                raise b.fail(f"Can't find end of the entity starting at byte offset {b.byte_offset(i)}")
            start = b.pos
            b.emit(src[i + len(token) : end])
            b.add({"*": "bold", "_": "italic", "`": "code", "```": "pre"}[token], start)
            i = end + len(token)
        elif c == "[":
            m = re.compile(r"\[([^\]]*)\]\(([^)]*)\)").match(src, i)
            if not m:
                raise b.fail(f"Can't find end of the entity starting at byte offset {b.byte_offset(i)}")
            start = b.pos
            b.emit(m.group(1))
            b.add("text_link", start, url=m.group(2))
            i = m.end()
        else:
            b.emit(c)
            i += 1
    return b.result()


PARSERS: dict[str, Callable[[str], tuple[str, list[JSON]]]] = {
    "html": parse_html,
    "markdownv2": parse_markdown_v2,
    "markdown": parse_markdown,
}


# ----------------------------------------------------------------------------------------------


class FakeBotAPI:
    """An in-process Bot API server: real HTTP on 127.0.0.1, state kept in memory for assertions."""

    METHODS = (
        "getMe", "getUpdates", "setWebhook", "deleteWebhook", "getWebhookInfo", "logOut", "close",
        "setMyCommands", "getMyCommands", "deleteMyCommands", "setMyDescription", "setMyShortDescription",
        "setChatMenuButton", "sendMessage", "sendPhoto", "sendMediaGroup", "sendDocument", "sendChatAction",
        "getFile", "answerCallbackQuery", "editMessageText", "editMessageCaption", "editMessageReplyMarkup",
        "deleteMessage",
    )

    def __init__(self, token: str = "123456:TEST-TOKEN", bot_id: int = 123456, username: str = "ff_test_bot") -> None:
        self.token, self.bot_id, self.username = token, bot_id, username
        self.bot_user: JSON = {"id": bot_id, "is_bot": True, "first_name": "FocusedFashion Test", "username": username}
        self.root = ""
        self.calls: list[Call] = []
        self.webhook: JSON | None = None  # what setWebhook recorded
        self.webhook_log: list[tuple[int, int | str]] = []  # (update_id, HTTP status or error) per delivery try
        self.deliveries: list[tuple[int, str, int | str]] = []  # (update_id, URL, HTTP status or error) per try
        self.backends: list[str] = []  # see balance()
        self._next_backend = 0
        self.logged_out = False
        self._handlers = {name.lower(): (name, getattr(self, f"_m_{name}")) for name in self.METHODS}
        self._users: dict[int, JSON] = {}
        self._chats: dict[int, ChatState] = {}
        self._files: dict[str, StoredFile] = {}
        self._files_by_path: dict[str, StoredFile] = {}
        self._file_counter = 0
        self._updates: list[JSON] = []
        self._next_update_id = 1
        self._allowed_updates: list[str] = []
        self._callbacks: dict[str, bool] = {}  # callback_query id -> answered
        self._commands: dict[tuple[str, str], list[JSON]] = {}
        self._faults: dict[str, deque[ApiError]] = defaultdict(deque)
        self._url_content: dict[str, bytes] = {}
        self._bad_urls: set[str] = set()
        self._media_group_counter = 0
        self._poll_generation = 0
        self._changed = asyncio.Event()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._webhook_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("FakeBotAPI already started")
        self._loop = asyncio.get_running_loop()
        self._closing = False
        app = web.Application(client_max_size=MAX_UPLOAD_BYTES + 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.root = f"http://{host}:{port}"

    async def stop(self) -> None:
        """Wakes every long poll (they answer at once) and closes the server."""
        self._closing = True
        self._wake()
        await self._stop_webhook()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> FakeBotAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what users do -----------------------------------------------------------------------

    def add_user(self, user_id: int, *, first_name: str | None = None, language_code: str = "en",
                 username: str | None = None) -> JSON:
        """Registers a private chat with ``user_id`` (as if they had opened the bot) and returns the User."""
        user = self._users.get(user_id)
        if user is None:
            user = {"id": user_id, "is_bot": False, "first_name": first_name or f"User{user_id}"}
            if username:
                user["username"] = username
            self._users[user_id] = user
            chat = {"id": user_id, "type": "private", "first_name": user["first_name"]}
            if username:
                chat["username"] = username
            self._chats[user_id] = ChatState(chat=chat)
        user["language_code"] = language_code
        return copy.deepcopy(user)

    def user_sends_text(self, user_id: int, text: str, *, language_code: str = "en") -> JSON:
        entities = []
        if m := re.match(r"/[A-Za-z0-9_]{1,32}(@[A-Za-z0-9_]+)?", text):
            entities.append({"type": "bot_command", "offset": 0, "length": _u16(m.group(0))})
        content: JSON = {"text": text}
        if entities:
            content["entities"] = entities
        return self._user_message(user_id, language_code, content)

    def user_sends_command(self, user_id: int, command: str, args: str = "", *, language_code: str = "en") -> JSON:
        cmd = "/" + command.lstrip("/")
        text = f"{cmd} {args}" if args else cmd
        content = {"text": text, "entities": [{"type": "bot_command", "offset": 0, "length": _u16(cmd)}]}
        return self._user_message(user_id, language_code, content)

    def user_sends_photo(self, user_id: int, jpeg: bytes, *, media_group_id: str | None = None,
                         file_size: int | None = None, caption: str | None = None,
                         language_code: str = "en") -> JSON:
        """A photo as Telegram delivers it: three PhotoSize entries, the largest being ``jpeg`` itself.

        ``file_size`` overrides the largest size's reported size (e.g. > 20 MB, which ``getFile`` refuses).
        Bytes that are no picture are accepted (every size then carries them) to test the bot's refusal.
        """
        content: JSON = {"photo": self._store_photo(jpeg, file_size=file_size, strict=False)}
        if media_group_id is not None:
            content["media_group_id"] = media_group_id
        if caption is not None:
            content["caption"] = caption
        return self._user_message(user_id, language_code, content)

    def user_sends_document(self, user_id: int, data: bytes, *, file_name: str, mime_type: str,
                            file_size: int | None = None, language_code: str = "en") -> JSON:
        doc = self._store_document(data, file_name=file_name, mime_type=mime_type, file_size=file_size)
        return self._user_message(user_id, language_code, {"document": doc})

    def user_sends_sticker(self, user_id: int, *, language_code: str = "en") -> JSON:
        img = Image.new("RGBA", (512, 512), (255, 200, 0, 255))
        buf = io.BytesIO()
        img.save(buf, format="WEBP")
        f = self._new_file("sticker", buf.getvalue(), ext="webp", mime_type="image/webp")
        sticker = {"file_id": f.file_id, "file_unique_id": f.file_unique_id, "type": "regular", "width": 512,
                   "height": 512, "is_animated": False, "is_video": False, "emoji": "👍", "file_size": f.file_size}
        return self._user_message(user_id, language_code, {"sticker": sticker})

    def user_presses_button(self, user_id: int, message_id: int, data: str, *, chat_id: int | None = None) -> JSON:
        """Presses the button with ``callback_data == data`` on the bot's message (its current keyboard).

        Raises ``LookupError``/``ValueError`` when there is no such message or button: a real user can
        only press what is shown. Forge callback data with :meth:`inject_update` instead.
        """
        chat_id = user_id if chat_id is None else chat_id
        state = self._chats.get(chat_id)
        message = state.messages.get(message_id) if state else None
        if message is None or message.get("from", {}).get("id") != self.bot_id:
            raise LookupError(f"no message {message_id} from the bot in chat {chat_id}")
        shown = [btn.get("callback_data") for row in message.get("reply_markup", {}).get("inline_keyboard", []) for btn in row]
        if data not in shown:
            raise ValueError(f"message {message_id} shows no button with callback_data {data!r} (shown: {shown}); "
                             "use inject_update() for forged data")
        user = self._users.get(user_id) or self.add_user(user_id)
        query = {"id": str(secrets.randbits(62)), "from": copy.deepcopy(user), "message": copy.deepcopy(message),
                 "chat_instance": str(chat_id * 7919 + self.bot_id), "data": data}
        self._callbacks[query["id"]] = False
        return self._queue({"callback_query": query})

    def user_blocks_bot(self, user_id: int, blocked: bool = True) -> None:
        """After this, sends to the user fail with 403 "Forbidden: bot was blocked by the user"."""
        if user_id not in self._chats:
            self.add_user(user_id)
        self._chats[user_id].blocked = blocked

    def inject_update(self, update: JSON) -> None:
        """Queues a raw update as given (forged callback data, unusual types); ``update_id`` is added if absent."""
        update = copy.deepcopy(update)
        if "update_id" in update:
            self._next_update_id = max(self._next_update_id, int(update["update_id"]) + 1)
        if query := update.get("callback_query"):
            self._callbacks.setdefault(str(query.get("id")), False)
        self._remember(update)
        self._queue(update)

    def serve_url(self, url: str, data: bytes) -> None:
        """What the "internet" holds at ``url`` when the bot sends it as a photo/document URL."""
        self._url_content[url] = data

    def fail_url(self, url: str) -> None:
        """Sending ``url`` fails like an unreachable page: 400 "failed to get HTTP URL content"."""
        self._bad_urls.add(url)

    # -- what the bot did ----------------------------------------------------------------------

    def calls_of(self, method: str, *, chat_id: int | None = None) -> list[Call]:
        """Calls of ``method`` (any letter case), failed ones included; optionally only to ``chat_id``."""
        name = method.lower()
        return [c for c in self.calls if c.method.lower() == name and (chat_id is None or c.params.get("chat_id") == chat_id)]

    def messages_to(self, chat_id: int) -> list[JSON]:
        """The bot's live (not deleted) messages in the chat, in order, as they are now (after edits)."""
        state = self._chats.get(chat_id)
        if state is None:
            return []
        return [copy.deepcopy(m) for _, m in sorted(state.messages.items()) if m["from"]["id"] == self.bot_id]

    def message(self, chat_id: int, message_id: int) -> JSON | None:
        state = self._chats.get(chat_id)
        found = state.messages.get(message_id) if state else None
        return copy.deepcopy(found) if found else None

    def commands(self, scope: JSON | None = None, language_code: str = "") -> list[JSON]:
        return copy.deepcopy(self._commands.get(self._commands_key(scope, language_code), []))

    @property
    def pending_updates(self) -> list[JSON]:
        """Updates queued and not yet confirmed by a later ``getUpdates`` offset (or webhook delivery)."""
        return copy.deepcopy(self._updates)

    async def wait_for(self, predicate: Callable[[FakeBotAPI], bool], timeout: float = 30.0) -> None:
        """Polls ``predicate(self)`` until true; ``TimeoutError`` lists the calls so far if it never is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            if loop.time() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s; the bot's calls so far:\n{self.summary()}")
            await asyncio.sleep(0.02)

    def summary(self, last: int = 40) -> str:
        """One line per call (long polls left out), for failure messages."""
        lines = []
        start = self.calls[0].time if self.calls else 0.0
        for c in [c for c in self.calls if c.method != "getUpdates"][-last:]:
            p = c.params
            what = p.get("text") or p.get("caption") or p.get("callback_query_id") or ""
            media = ",".join(m.kind for m in c.media)
            lines.append(f"  +{c.time - start:6.2f}s {c.status} {c.method} chat={p.get('chat_id')} "
                         f"{media} {str(what)[:60]!r}" + ("" if c.ok else f" -> {c.result}"))
        return "\n".join(lines) or "  (none)"

    def fail_next(self, method: str, *, status: int = 429, retry_after: int = 1, description: str | None = None) -> None:
        """The next call of ``method`` fails (queued: call twice to fail two calls). 429 carries ``retry_after``."""
        parameters = None
        if status == 429:
            description = description or f"Too Many Requests: retry after {retry_after}"
            parameters = {"retry_after": retry_after}
        elif description is None:
            phrase = {400: "Bad Request: injected failure", 403: "Forbidden: bot was blocked by the user"}
            description = phrase.get(status) or HTTPStatus(status).phrase
        self._faults[method.lower()].append(ApiError(status, description, parameters))

    # -- HTTP ----------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/file/bot"):
            return self._download(path.removeprefix("/file/bot"))
        if not path.startswith("/bot") or "/" not in path[4:]:
            return self._answer(ApiError(404, "Not Found"))
        token, _, name = path[4:].partition("/")
        canonical, handler = self._handlers.get(name.lower(), (name, None))
        call = Call(method=canonical, params={}, files={}, time=time.monotonic())
        self.calls.append(call)
        try:
            call.params, uploads = await self._read_params(request)
            call.files = {k: u.data for k, u in uploads.items()}
            if token != self.token:
                raise ApiError(401, "Unauthorized")
            if handler is None:
                raise ApiError(404, "Not Found: method not found")
            if self._faults[name.lower()]:
                raise self._faults[name.lower()].popleft()
            result = handler(call, uploads)
            if asyncio.iscoroutine(result):
                result = await result
        except ApiError as err:
            call.status, call.result = err.status, err.description
            return self._answer(err)
        except Exception as exc:  # a bug in the fake: answer like a server error, loudly
            err = ApiError(500, f"Internal Server Error: fake Bot API failed: {exc!r}")
            call.status, call.result = err.status, err.description
            return self._answer(err)
        call.result = result
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def _answer(err: ApiError) -> web.Response:
        return web.json_response(err.body(), status=err.status)

    async def _read_params(self, request: web.Request) -> tuple[JSON, dict[str, _Upload]]:
        raw: dict[str, Any] = dict(request.query)
        uploads: dict[str, _Upload] = {}
        if request.body_exists:
            if request.content_type == "application/json":
                try:
                    body = await request.json()
                except ValueError:
                    raise bad_request("can't parse JSON request body") from None
                if not isinstance(body, dict):
                    raise bad_request("JSON request body must be an object")
                return {**{k: _decode(k, v) for k, v in raw.items()}, **body}, uploads
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    uploads[key] = _Upload(value.file.read(), value.filename, value.content_type)
                else:
                    raw[key] = value
        return {k: _decode(k, v) for k, v in raw.items()}, uploads

    def _download(self, rest: str) -> web.Response:
        """``GET /file/bot<token>/<file_path>``; recorded in :attr:`calls` as method ``"download"``."""
        token, _, file_path = rest.partition("/")
        call = Call(method="download", params={"file_path": file_path}, files={}, time=time.monotonic())
        self.calls.append(call)
        stored = self._files_by_path.get(file_path)
        if token != self.token or stored is None:
            err = ApiError(401, "Unauthorized") if token != self.token else ApiError(404, "Not Found")
            call.status, call.result = err.status, err.description
            return self._answer(err)
        call.result = stored.file_id
        return web.Response(body=stored.data, content_type=stored.mime_type)

    # -- updates -------------------------------------------------------------------------------

    def _queue(self, body: JSON) -> JSON:
        update = {"update_id": self._next_update_id, **body} if "update_id" not in body else body
        self._next_update_id = max(self._next_update_id, update["update_id"] + 1)
        self._updates.append(update)
        self._wake()
        return copy.deepcopy(update)

    def _wake(self) -> None:
        """Wakes long polls and webhook delivery (callable from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                loop.call_soon_threadsafe(self._wake)
                return
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _deliverable(self, limit: int) -> list[JSON]:
        allowed = set(self._allowed_updates)
        kept = []
        for update in self._updates:
            kind = next((k for k in update if k != "update_id"), "")
            if (kind in allowed) if allowed else (kind not in DEFAULT_EXCLUDED_UPDATES):
                kept.append(update)
        self._updates = kept  # the real API never stores updates of types the bot did not ask for
        return copy.deepcopy(kept[:limit])

    async def _m_getUpdates(self, call: Call, uploads: dict[str, _Upload]) -> list[JSON]:
        p = call.params
        offset, limit = _int(p, "offset", 0), _int(p, "limit", 100)
        timeout = min(float(_int(p, "timeout", 0)), MAX_LONG_POLL_S)
        if not 1 <= limit <= 100:
            limit = 100
        if p.get("allowed_updates") is not None:
            if not isinstance(p["allowed_updates"], list):
                raise bad_request("can't parse allowed updates")
            self._allowed_updates = [str(x) for x in p["allowed_updates"]]
        if offset < 0:
            self._updates = self._updates[offset:]
        elif offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        self._poll_generation += 1
        generation = self._poll_generation
        self._wake()  # an older poll still waiting is terminated, like the real API does
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.webhook is not None:
                raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                    "use deleteWebhook to delete the webhook first")
            if generation != self._poll_generation:
                raise ApiError(409, "Conflict: terminated by other getUpdates request; "
                                    "make sure that only one bot instance is running")
            batch = self._deliverable(limit)
            remaining = deadline - loop.time()
            if batch or self._closing or remaining <= 0:
                return batch
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    # -- webhook -------------------------------------------------------------------------------

    async def _m_setWebhook(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        p = call.params
        url = str(p.get("url") or "")
        if not url:
            await self._drop_webhook(bool(p.get("drop_pending_updates")))
            return True
        parts = urlsplit(url)
        if parts.scheme != "https" and not (parts.scheme == "http" and _is_loopback(parts.hostname)):
            raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        secret = p.get("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", str(secret)):
            raise bad_request("secret token contains unallowed characters")
        if p.get("allowed_updates") is not None:
            self._allowed_updates = [str(x) for x in p["allowed_updates"]]
        if p.get("drop_pending_updates"):
            self._updates.clear()
        await self._stop_webhook()
        self.webhook = {"url": url, "secret_token": secret, "max_connections": _int(p, "max_connections", 40),
                        "allowed_updates": p.get("allowed_updates"), "ip_address": p.get("ip_address"),
                        "last_error_date": None, "last_error_message": None}
        self._poll_generation += 1
        self._wake()
        if _is_loopback(parts.hostname):  # nothing else is reachable from a test
            self._webhook_task = asyncio.get_running_loop().create_task(self._deliver_webhook(dict(self.webhook)))
        return True

    async def _m_deleteWebhook(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        await self._drop_webhook(bool(call.params.get("drop_pending_updates")))
        return True

    async def _drop_webhook(self, drop_pending: bool) -> None:
        await self._stop_webhook()
        self.webhook = None
        if drop_pending:
            self._updates.clear()

    def _m_getWebhookInfo(self, call: Call, uploads: dict[str, _Upload]) -> JSON:
        info: JSON = {"url": "", "has_custom_certificate": False, "pending_update_count": len(self._updates)}
        if self.webhook:
            info["url"] = self.webhook["url"]
            info["max_connections"] = self.webhook["max_connections"]
            if self.webhook.get("allowed_updates") is not None:
                info["allowed_updates"] = self.webhook["allowed_updates"]
            if self.webhook["last_error_date"]:
                info["last_error_date"] = self.webhook["last_error_date"]
                info["last_error_message"] = self.webhook["last_error_message"]
        return info

    async def _stop_webhook(self) -> None:
        task, self._webhook_task = self._webhook_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _deliver_webhook(self, hook: JSON) -> None:
        """POSTs queued updates to the (loopback) webhook as Telegram does: up to ``max_connections`` at
        a time, each retried until it is answered with 2xx. With :meth:`balance`, to the backends in turn."""
        headers = {"X-Telegram-Bot-Api-Secret-Token": hook["secret_token"]} if hook["secret_token"] else {}
        slots = asyncio.Semaphore(hook["max_connections"])
        in_flight: dict[int, asyncio.Task[None]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)) as session:
            try:
                while not self._closing:
                    changed = self._changed
                    batch = [u for u in self._deliverable(100) if u["update_id"] not in in_flight]
                    if not batch:
                        await changed.wait()
                        continue
                    for update in batch:
                        await slots.acquire()
                        task = asyncio.get_running_loop().create_task(self._post_update(session, hook, headers, update))
                        in_flight[update["update_id"]] = task
                        task.add_done_callback(lambda _t, uid=update["update_id"]: (in_flight.pop(uid, None), slots.release(), self._wake()))
            finally:
                for task in list(in_flight.values()):
                    task.cancel()
                await asyncio.gather(*in_flight.values(), return_exceptions=True)

    async def _post_update(self, session: aiohttp.ClientSession, hook: JSON, headers: JSON, update: JSON) -> None:
        """One delivery try; a failed one waits a little before its update may be tried again."""
        outcome = await self.post_update(update, self._next_target(hook["url"]), session=session, headers=headers)
        if isinstance(outcome, int) and 200 <= outcome < 300:
            self._updates = [u for u in self._updates if u["update_id"] != update["update_id"]]
            return
        if self.webhook is not None:
            self.webhook["last_error_date"] = int(time.time())
            self.webhook["last_error_message"] = f"Wrong response from the webhook: {outcome}" if isinstance(outcome, int) else outcome
        await asyncio.sleep(0.2)

    def _next_target(self, url: str) -> str:
        if not self.backends:
            return url
        target = self.backends[self._next_backend % len(self.backends)]
        self._next_backend += 1
        return target

    def balance(self, backends: list[str], *, start: int = 0) -> None:
        """Play the load balancer in front of several bot replicas: webhook deliveries go to ``backends``
        (full URLs) in turn, starting with ``backends[start]``; a failed try goes to the next one."""
        self.backends, self._next_backend = list(backends), start

    def deliver_next_to(self, index: int) -> None:
        """The next webhook delivery goes to ``backends[index]``."""
        self._next_backend = index

    async def post_update(self, update: JSON, url: str, *, session: aiohttp.ClientSession | None = None,
                          headers: JSON | None = None) -> int | str:
        """POST ``update`` to ``url`` once, as Telegram would (with the webhook's secret): what a re-delivery
        does. Returns the HTTP status or the error; logged in :attr:`webhook_log` and :attr:`deliveries`."""
        if headers is None:
            secret = (self.webhook or {}).get("secret_token")
            headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
        own = session is None
        session = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S))
        try:
            async with session.post(url, json=update, headers=headers) as resp:
                await resp.read()
                outcome: int | str = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            if own:
                await session.close()
        self.webhook_log.append((update["update_id"], outcome))
        self.deliveries.append((update["update_id"], url, outcome))
        return outcome

    # -- bot info ------------------------------------------------------------------------------

    def _m_getMe(self, call: Call, uploads: dict[str, _Upload]) -> JSON:
        return {**self.bot_user, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False, "can_connect_to_business": False, "has_main_web_app": False}

    def _m_logOut(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        self.logged_out = True
        return True

    def _m_close(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        return True

    @staticmethod
    def _commands_key(scope: Any, language_code: Any) -> tuple[str, str]:
        return json.dumps(scope or {"type": "default"}, sort_keys=True), str(language_code or "")

    def _m_setMyCommands(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        commands = call.params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise bad_request("can't parse commands JSON object")
        for cmd in commands:
            if not isinstance(cmd, dict) or not re.fullmatch(r"[a-z0-9_]{1,32}", str(cmd.get("command", ""))):
                raise bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(cmd.get("description", "")).strip()) <= 256:
                raise bad_request("command description must be non-empty")
        key = self._commands_key(call.params.get("scope"), call.params.get("language_code"))
        self._commands[key] = [{"command": c["command"], "description": c["description"]} for c in commands]
        return True

    def _m_getMyCommands(self, call: Call, uploads: dict[str, _Upload]) -> list[JSON]:
        return self.commands(call.params.get("scope"), call.params.get("language_code") or "")

    def _m_deleteMyCommands(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        self._commands.pop(self._commands_key(call.params.get("scope"), call.params.get("language_code")), None)
        return True

    def _m_setMyDescription(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        return True

    def _m_setMyShortDescription(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        return True

    def _m_setChatMenuButton(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        return True

    # -- sending -------------------------------------------------------------------------------

    def _m_sendMessage(self, call: Call, uploads: dict[str, _Upload]) -> JSON:
        p = call.params
        state = self._target(p)
        text, entities = self._formatted(p, "text", "entities", limit=MAX_TEXT, too_long="message is too long")
        if not text.strip():
            raise bad_request("message text is empty")
        content: JSON = {"text": text}
        if entities:
            content["entities"] = entities
        if isinstance(p.get("link_preview_options"), dict):
            content["link_preview_options"] = p["link_preview_options"]
        return self._bot_message(state, p, content)

    def _m_sendPhoto(self, call: Call, uploads: dict[str, _Upload]) -> JSON:
        p = call.params
        state = self._target(p)
        stored = self._input_file(call, uploads, p.get("photo"), "photo", "photo")
        content: JSON = {"photo": copy.deepcopy(stored.photo)}
        content.update(self._caption(p))
        return self._bot_message(state, p, content)

    def _m_sendDocument(self, call: Call, uploads: dict[str, _Upload]) -> JSON:
        p = call.params
        state = self._target(p)
        stored = self._input_file(call, uploads, p.get("document"), "document", "document")
        content: JSON = {"document": copy.deepcopy(stored.document)}
        content.update(self._caption(p))
        return self._bot_message(state, p, content)

    def _m_sendMediaGroup(self, call: Call, uploads: dict[str, _Upload]) -> list[JSON]:
        p = call.params
        state = self._target(p)
        items = p.get("media")
        if not isinstance(items, list) or not items:
            raise bad_request("media to send are not specified")
        if not 2 <= len(items) <= 10:
            raise bad_request(f"wrong number of media in the media group: {len(items)} (must be 2-10)")
        kinds = {item.get("type") if isinstance(item, dict) else None for item in items}
        if not kinds <= {"photo", "document"} or len(kinds) != 1:
            raise bad_request("the fake Bot API supports media groups of only photos or only documents")
        if p.get("reply_markup") is not None:
            raise bad_request("media groups can't have reply_markup")
        contents = []
        for item in items:  # validate and store every item before any message exists
            kind = item["type"]
            stored = self._input_file(call, uploads, item.get("media"), kind, None)
            content: JSON = {"photo": stored.photo} if kind == "photo" else {"document": stored.document}
            content = copy.deepcopy(content)
            content.update(self._caption(item))
            contents.append(content)
        self._media_group_counter += 1
        group_id = str(13_000_000_000_000_000 + self._media_group_counter)
        return [self._bot_message(state, p, {**c, "media_group_id": group_id}) for c in contents]

    def _m_sendChatAction(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        self._target(call.params)
        if call.params.get("action") not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        return True

    def _m_getFile(self, call: Call, uploads: dict[str, _Upload]) -> JSON:
        stored = self._files.get(str(call.params.get("file_id") or ""))
        if stored is None:
            raise bad_request("invalid file_id")
        if stored.file_size > MAX_DOWNLOAD_BYTES:
            raise bad_request("file is too big")
        return {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                "file_size": stored.file_size, "file_path": stored.file_path}

    # -- callbacks and edits -------------------------------------------------------------------

    def _m_answerCallbackQuery(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        query_id = str(call.params.get("callback_query_id") or "")
        if self._callbacks.get(query_id, True):  # unknown or already answered
            raise bad_request(QUERY_INVALID)
        if len(str(call.params.get("text") or "")) > 200:
            raise bad_request("MESSAGE_TOO_LONG")
        self._callbacks[query_id] = True
        return True

    def _m_editMessageReplyMarkup(self, call: Call, uploads: dict[str, _Upload]) -> JSON | bool:
        message = self._editable(call.params)
        if message is None:
            return True
        markup = self._markup(call.params)
        if markup == message.get("reply_markup"):
            raise bad_request(NOT_MODIFIED)
        return self._apply_edit(message, {"reply_markup": markup}, dated=False)

    def _m_editMessageText(self, call: Call, uploads: dict[str, _Upload]) -> JSON | bool:
        message = self._editable(call.params)
        text, entities = self._formatted(call.params, "text", "entities", limit=MAX_TEXT, too_long="MESSAGE_TOO_LONG")
        if not text.strip():
            raise bad_request("message text is empty")
        if message is None:
            return True
        if "text" not in message:
            raise bad_request("there is no text in the message to edit")
        return self._edit_content(message, call.params, {"text": text, "entities": entities or None})

    def _m_editMessageCaption(self, call: Call, uploads: dict[str, _Upload]) -> JSON | bool:
        message = self._editable(call.params)
        caption, entities = self._formatted(call.params, "caption", "caption_entities", limit=MAX_CAPTION,
                                            too_long="message caption is too long")
        if message is None:
            return True
        if "text" in message:
            raise bad_request("there is no caption in the message to edit")
        return self._edit_content(message, call.params, {"caption": caption or None, "caption_entities": entities or None})

    def _m_deleteMessage(self, call: Call, uploads: dict[str, _Upload]) -> bool:
        state = self._chat_of(call.params)
        message_id = _int(call.params, "message_id", 0)
        if state is None or state.messages.pop(message_id, None) is None:
            raise bad_request("message to delete not found")
        return True

    # -- helpers -------------------------------------------------------------------------------

    def _remember(self, update: JSON) -> None:
        """A raw update's sender gets a chat and its message is stored, so the bot can answer/reply to it."""
        for body in update.values():
            if not isinstance(body, dict) or not isinstance(sender := body.get("from"), dict):
                continue
            if isinstance(sender.get("id"), int) and not sender.get("is_bot") and sender["id"] not in self._users:
                self._users[sender["id"]] = copy.deepcopy(sender)
                self._chats[sender["id"]] = ChatState(chat={"id": sender["id"], "type": "private",
                                                            "first_name": sender.get("first_name", "")})
            chat = body.get("chat") or {}
            state = self._chats.get(chat.get("id"))
            message_id = body.get("message_id")
            if state is not None and isinstance(message_id, int) and message_id not in state.messages:
                state.messages[message_id] = copy.deepcopy(body)
                state.next_message_id = max(state.next_message_id, message_id + 1)

    def _user_message(self, user_id: int, language_code: str, content: JSON) -> JSON:
        user = self.add_user(user_id, language_code=language_code)
        state = self._chats[user_id]
        message = {"message_id": self._next_message_id(state), "from": copy.deepcopy(user), "chat": dict(state.chat),
                   "date": int(time.time()), **content}
        state.messages[message["message_id"]] = message
        return self._queue({"message": copy.deepcopy(message)})

    @staticmethod
    def _next_message_id(state: ChatState) -> int:
        state.next_message_id += 1
        return state.next_message_id - 1

    def _chat_of(self, p: JSON) -> ChatState | None:
        chat_id = p.get("chat_id")
        if chat_id is None or chat_id == "":
            raise bad_request("chat_id is empty")
        return self._chats.get(chat_id) if isinstance(chat_id, int) and not isinstance(chat_id, bool) else None

    def _target(self, p: JSON) -> ChatState:
        """The chat a send goes to: it must exist (the user wrote first) and must not have blocked the bot."""
        state = self._chat_of(p)
        if state is None:
            raise bad_request("chat not found")
        if state.blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        return state

    def _bot_message(self, state: ChatState, p: JSON, content: JSON) -> JSON:
        markup = self._markup(p)
        reply = p.get("reply_parameters") if isinstance(p.get("reply_parameters"), dict) else {}
        reply_to = reply.get("message_id", p.get("reply_to_message_id"))
        message: JSON = {"message_id": 0, "from": dict(self.bot_user), "chat": dict(state.chat), "date": int(time.time())}
        if reply_to is not None:
            original = state.messages.get(reply_to) if isinstance(reply_to, int) else None
            if original is not None:
                message["reply_to_message"] = {k: v for k, v in original.items() if k != "reply_to_message"}
            elif not (reply.get("allow_sending_without_reply") or p.get("allow_sending_without_reply")):
                raise bad_request("message to be replied not found")
        message.update(content)
        if markup is not None:
            message["reply_markup"] = markup
        message["message_id"] = self._next_message_id(state)
        state.messages[message["message_id"]] = message
        return copy.deepcopy(message)

    def _formatted(self, p: JSON, field_name: str, entities_field: str, *, limit: int, too_long: str) -> tuple[str, list[JSON]]:
        raw = p.get(field_name)
        text = "" if raw is None else str(raw)
        entities = p.get(entities_field) if isinstance(p.get(entities_field), list) else []
        mode = p.get("parse_mode")
        if mode:
            parser = PARSERS.get(str(mode).lower())
            if parser is None:
                raise bad_request(f"unsupported parse_mode {mode!r}")
            text, entities = parser(text)
        if _u16(text) > limit:
            raise bad_request(too_long)
        return text, entities

    def _caption(self, p: JSON) -> JSON:
        caption, entities = self._formatted(p, "caption", "caption_entities", limit=MAX_CAPTION,
                                            too_long="message caption is too long")
        out: JSON = {}
        if caption:
            out["caption"] = caption
        if entities:
            out["caption_entities"] = entities
        return out

    @staticmethod
    def _markup(p: JSON) -> JSON | None:
        """Validates ``reply_markup``; returns the inline keyboard (the only kind a Message carries)."""
        markup = p.get("reply_markup")
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise bad_request("can't parse reply keyboard markup JSON object")
        if "inline_keyboard" not in markup:
            if not {"keyboard", "remove_keyboard", "force_reply"} & markup.keys():
                raise bad_request("can't parse reply keyboard markup JSON object")
            return None
        rows = markup["inline_keyboard"]
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise bad_request("can't parse inline keyboard button: InlineKeyboardButton must be an Object")
        if sum(len(r) for r in rows) > 100:
            raise bad_request("reply markup is too long")
        for button in (b for r in rows for b in r):
            if not isinstance(button, dict) or not str(button.get("text") or "").strip():
                raise bad_request("BUTTON_TEXT_INVALID")
            kinds = [k for k in BUTTON_KINDS if k in button]
            if not kinds:
                raise bad_request("text buttons are unallowed in the inline keyboard")
            if len(kinds) > 1:
                raise bad_request("can't parse inline keyboard button: only one of the optional fields must be used")
            data = button.get("callback_data")
            if data is not None and not 1 <= len(str(data).encode()) <= MAX_CALLBACK_DATA_BYTES:
                raise bad_request("BUTTON_DATA_INVALID")
            if button.get("url") is not None:
                _check_button_url(str(button["url"]))
        return {"inline_keyboard": rows}

    def _editable(self, p: JSON) -> JSON | None:
        """The stored message an edit targets; ``None`` for inline messages (the answer is then ``True``)."""
        if p.get("inline_message_id"):
            return None
        state = self._chat_of(p)
        message = state.messages.get(_int(p, "message_id", 0)) if state else None
        if message is None:
            raise bad_request("message to edit not found")
        if message["from"]["id"] != self.bot_id:
            raise bad_request("message can't be edited")
        return message

    def _edit_content(self, message: JSON, p: JSON, changes: JSON) -> JSON:
        """Text/caption edits; without ``reply_markup`` the inline keyboard is removed, as on Telegram."""
        changes["reply_markup"] = self._markup(p)
        if all(message.get(k) == v for k, v in changes.items()):
            raise bad_request(NOT_MODIFIED)
        return self._apply_edit(message, changes, dated=True)

    @staticmethod
    def _apply_edit(message: JSON, changes: JSON, *, dated: bool) -> JSON:
        for key, value in changes.items():
            if value is None:
                message.pop(key, None)
            else:
                message[key] = value
        if dated:
            message["edit_date"] = int(time.time())
        return copy.deepcopy(message)

    # -- files ---------------------------------------------------------------------------------

    def _new_file(self, kind: str, data: bytes, *, ext: str, mime_type: str, file_size: int | None = None) -> StoredFile:
        self._file_counter += 1
        n = self._file_counter
        folder = {"photo": "photos", "document": "documents", "sticker": "stickers"}[kind]
        stored = StoredFile(file_id=f"{kind[:2].upper()}AC{n:06d}{secrets.token_hex(8)}", file_unique_id=f"AQAD{n:06d}",
                            kind=kind, data=data, file_size=len(data) if file_size is None else file_size,
                            file_path=f"{folder}/file_{n}.{ext}", mime_type=mime_type)
        self._files[stored.file_id] = stored
        self._files_by_path[stored.file_path] = stored
        return stored

    def _store_photo(self, data: bytes, *, file_size: int | None, strict: bool) -> list[JSON]:
        """Stores a photo as Telegram does (two downscaled JPEGs + the original) and returns its PhotoSizes."""
        width, height = 1280, 1280  # reported for bytes that are no picture
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if strict and (width + height > 10_000 or max(width, height) > 20 * min(width, height)):
                    raise bad_request("PHOTO_INVALID_DIMENSIONS")
                if width * height > MAX_DECODE_PIXELS:  # e.g. a test's decompression bomb: keep it undecoded
                    raise ValueError("too many pixels to downscale")
                img.draft("RGB", (PHOTO_SIDES[-1], PHOTO_SIDES[-1]))  # fast JPEG decode at reduced scale
                smaller = []
                for side in PHOTO_SIDES:
                    thumb = img.copy()
                    thumb.thumbnail((side, side))
                    smaller.append((_jpeg(thumb), *thumb.size))
        except ApiError:
            raise
        except Exception as exc:  # PIL raises many types for bad input
            if strict:
                raise bad_request("IMAGE_PROCESS_FAILED") from exc
            smaller = [(data, *_fit(width, height, side)) for side in PHOTO_SIDES]
        sizes = []
        for i, (blob, w, h) in enumerate([*smaller, (data, width, height)]):
            stored = self._new_file("photo", blob, ext="jpg", mime_type="image/jpeg",
                                    file_size=file_size if i == len(smaller) else None)
            sizes.append((stored, {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                                   "width": w, "height": h, "file_size": stored.file_size}))
        photo = [ps for _, ps in sizes]
        for stored, _ in sizes:
            stored.photo = photo
        return copy.deepcopy(photo)

    def _store_document(self, data: bytes, *, file_name: str | None, mime_type: str | None,
                        file_size: int | None = None) -> JSON:
        name = file_name or "document"
        ext = name.rsplit(".", 1)[-1] if "." in name else "bin"
        stored = self._new_file("document", data, ext=re.sub(r"[^A-Za-z0-9]", "", ext) or "bin",
                                mime_type=mime_type or "application/octet-stream", file_size=file_size)
        stored.document = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id, "file_name": name,
                           "mime_type": stored.mime_type, "file_size": stored.file_size}
        return copy.deepcopy(stored.document)

    def _input_file(self, call: Call, uploads: dict[str, _Upload], value: Any, kind: str,
                    field_name: str | None) -> StoredFile:
        """Resolves a photo/document input: a multipart upload, ``attach://name``, a URL or a file_id."""
        upload = None
        if value is None and field_name and field_name in uploads:
            upload, name = uploads[field_name], field_name
        elif isinstance(value, str) and value.startswith("attach://"):
            name = value.removeprefix("attach://")
            upload = uploads.get(name)
            if upload is None:
                raise bad_request("can't parse InputMedia: media not found")
        if upload is not None:
            if not upload.data:
                raise bad_request("file must be non-empty")
            if len(upload.data) > MAX_UPLOAD_BYTES:
                raise ApiError(413, "Request Entity Too Large")
            if kind == "photo" and len(upload.data) > MAX_PHOTO_UPLOAD_BYTES:
                raise bad_request("PHOTO_SAVE_FILE_INVALID")
            media = Media("upload", name, upload.data, upload.filename)
            stored = self._store(kind, upload.data, upload.filename, upload.content_type)
        elif isinstance(value, str) and re.match(r"https?://", value):
            if value in self._bad_urls:
                raise bad_request("failed to get HTTP URL content")
            data = self._url_content.get(value) or _placeholder_jpeg()
            media = Media("url", value)
            stored = self._store(kind, data, urlsplit(value).path.rsplit("/", 1)[-1] or None, None)
        elif isinstance(value, str) and value:
            found = self._files.get(value)
            if found is None:
                raise bad_request(WRONG_FILE)
            if found.kind != kind:
                raise bad_request("type of file mismatch")
            media, stored = Media("file_id", value), found
        else:
            raise bad_request(f"there is no {kind} in the request")
        call.media.append(media)
        return stored

    def _store(self, kind: str, data: bytes, filename: str | None, content_type: str | None) -> StoredFile:
        if kind == "photo":
            photo = self._store_photo(data, file_size=None, strict=True)
            return self._files[photo[-1]["file_id"]]
        doc = self._store_document(data, file_name=filename, mime_type=content_type)
        return self._files[doc["file_id"]]


@dataclass(frozen=True)
class _Upload:
    data: bytes
    filename: str | None
    content_type: str | None


_PLACEHOLDER: list[bytes] = []


def _placeholder_jpeg() -> bytes:
    """The picture a URL holds unless a test said otherwise (``serve_url``)."""
    if not _PLACEHOLDER:
        _PLACEHOLDER.append(_jpeg(Image.new("RGB", (320, 320), (200, 200, 200))))
    return _PLACEHOLDER[0]


def _decode(name: str, value: Any) -> Any:
    """Form values are strings; PTB JSON-encodes non-string parameters (ints, dicts, lists)."""
    if name in STRING_FIELDS or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _int(p: JSON, name: str, default: int) -> int:
    value = p.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise bad_request(f'field "{name}" must be of type Integer')
    try:
        return int(value)
    except ValueError:
        raise bad_request(f'field "{name}" must be of type Integer') from None
