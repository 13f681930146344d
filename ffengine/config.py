"""Settings from environment variables (and a ``.env`` file), validated at start.

One place reads the environment so that every entry point (CLI, bot, trainer)
agrees on names and defaults. Command-line flags override what is read here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from ffengine.errors import ConfigError

DEFAULT_WEIGHTS = "IMAGENET1K_V2"
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
#: Folders besides the catalogue's own that local product photos may live in (``os.pathsep``-separated).
IMAGE_ROOTS = "FFENGINE_IMAGE_ROOTS"
#: Hosts and networks the importer may download from although they are not public (comma-separated).
FETCH_ALLOW = "FFENGINE_FETCH_ALLOW"
#: Seconds one catalogue import may spend downloading images, all of them together (0: no deadline).
FETCH_DEADLINE = "FFENGINE_FETCH_DEADLINE"
_HOSTNAME = re.compile(r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")


#: Settings that name a file or folder: a relative value in a ``.env`` file is relative to that file's folder.
PATH_SETTINGS = ("FFENGINE_DATA_DIR", "FFENGINE_INDEX", "FFENGINE_CATALOG", "FFENGINE_EVAL_QUERIES")
#: Settings that are a file or folder, or something else (a torchvision weights name): resolved when that file is there.
MAYBE_PATH_SETTINGS = ("FFENGINE_WEIGHTS",)
DOTENV = ".env"


def find_dotenv_file(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The ``.env`` in ``start`` (default: the current folder) or the nearest folder above it, as git finds
    its repository: a command run from a sub-folder of the project reads the project's settings."""
    folder = Path(start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / DOTENV).is_file():
            return candidate / DOTENV
    return None


def load_dotenv_file(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Load ``path`` (default: :func:`find_dotenv_file`) into ``os.environ`` without overriding variables
    already set; returns the file read, if any.

    A relative path in it (``FFENGINE_DATA_DIR=data``) means relative to the file's folder, whichever
    folder the command runs in, so it is stored resolved.
    """
    from dotenv import load_dotenv

    file = Path(path) if path is not None else find_dotenv_file()
    if file is None or not file.is_file():
        return None
    already = set(os.environ)
    load_dotenv(file, override=False)
    folder = file.resolve().parent
    for name in (*PATH_SETTINGS, *MAYBE_PATH_SETTINGS, IMAGE_ROOTS):
        value = env_str(os.environ, name)
        if name not in already and value is not None:
            os.environ[name] = resolve_setting(name, value, folder)
    return file


def resolve_setting(name: str, value: str, folder: Path) -> str:
    """``value`` of the path setting ``name`` with relative paths taken from ``folder``."""
    if name == IMAGE_ROOTS:
        return os.pathsep.join(resolve_setting("", entry, folder) if entry.strip() else entry for entry in value.split(os.pathsep))
    path = Path(value.strip()).expanduser()
    if path.is_absolute() or (name in MAYBE_PATH_SETTINGS and not (folder / path).exists()):
        return value
    return str(folder / path)


def env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """Return the stripped value of ``name``; blank counts as unset."""
    value = env.get(name, "").strip()
    return value if value else default


def setting(env: str, default: Any = MISSING, *, parse: Callable[[str, str], Any] | None = None, minimum: float = 0, maximum: float | None = None, **kw: Any) -> Any:
    """A settings dataclass field read from the variable ``env``: its row in the one table of settings.

    The text is read by ``parse(text, env)``, which raises :class:`ConfigError` (default: the default's type;
    numbers must lie in ``minimum``..``maximum``); blank or unset means ``default``. ``kw`` goes to
    :func:`dataclasses.field`.
    """
    return field(default=default, **kw, metadata={"env": env, "parse": parse, "minimum": minimum, "maximum": maximum})


def read_env(cls: type, env: Mapping[str, str], *only: str) -> dict[str, Any]:
    """The parsed values of the fields of ``cls`` (or of those in ``only``) whose variable is set in ``env``.

    Raises :class:`ConfigError` naming the variable, in one line, when a value is malformed.
    """
    values: dict[str, Any] = {}
    for f in fields(cls):
        if "env" not in f.metadata or (only and f.name not in only):
            continue
        name, raw = f.metadata["env"], env_str(env, f.metadata["env"])
        if raw is None:
            continue
        if f.metadata["parse"]:
            values[f.name] = f.metadata["parse"](raw, name)
        elif isinstance(f.default, (int, float)):
            values[f.name] = _number(raw, name, type(f.default), f.metadata["minimum"], f.metadata["maximum"])
        else:  # str, Path
            values[f.name] = type(f.default)(raw)
    return values


def env_setting(cls: type, name: str, env: Mapping[str, str] | None = None) -> Any:
    """The field ``name`` of ``cls`` as ``env`` (default: the process environment) sets it, else its default."""
    return read_env(cls, os.environ if env is None else env, name).get(name, getattr(cls, name))


def one_of(*choices: str, case: Callable[[str], str] = str) -> Callable[[str, str], str]:
    """A ``parse`` for :func:`setting` that accepts ``choices``, after ``case`` (such as ``str.lower``)."""

    def parse(raw: str, name: str) -> str:
        if case(raw) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {case(raw)!r}")
        return case(raw)

    return parse


def _number(raw: str, name: str, kind: type, low: float, high: float | None) -> float:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name} must be {f'at least {low}' if high is None else f'from {low} to {high}'}, got {value}")
    return value


def normalise_host(host: str) -> str:
    """``"Images.LAN."`` -> ``"images.lan"``: how host names are compared."""
    return host.strip().rstrip(".").lower()


@dataclass(frozen=True)
class FetchAllow:
    """What :data:`FETCH_ALLOW` opens: host names trusted whatever they resolve to, and networks.

    Everything else that is not a public address is refused by :mod:`ffengine.fetch`
    (a catalogue must not make the importer fetch from the machine or its LAN).
    """

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPv4Network | IPv6Network, ...] = ()

    @classmethod
    def parse(cls, value: str, setting: str = FETCH_ALLOW) -> FetchAllow:
        """``"images.lan, 10.0.0.0/8, 127.0.0.1"`` (a bare address is a one-address network)."""
        hosts: set[str] = set()
        networks: list[IPv4Network | IPv6Network] = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry:
                continue
            try:
                networks.append(ip_network(entry))
                continue
            except ValueError as exc:
                problem = str(exc)
            host = normalise_host(entry)
            if "/" in entry or ":" in entry or not _HOSTNAME.fullmatch(host) or host.replace(".", "").isdigit():
                raise ConfigError(f"{setting}: {entry!r} is neither a host name nor a network such as 10.0.0.0/8 ({problem})")
            hosts.add(host)
        return cls(frozenset(hosts), tuple(networks))


def env_fetch_allow(env: Mapping[str, str] | None = None) -> FetchAllow:
    """:data:`FETCH_ALLOW` from ``env`` (default: the process environment); unset allows nothing extra."""
    return env_setting(EngineSettings, "fetch_allow", env)


def env_fetch_deadline(env: Mapping[str, str] | None = None) -> float | None:
    """:data:`FETCH_DEADLINE` from ``env`` (default: the process environment) in seconds; ``None`` when it is 0."""
    return env_setting(EngineSettings, "fetch_deadline_s", env) or None


def env_image_roots(env: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """:data:`IMAGE_ROOTS` from ``env`` (default: the process environment), each an existing folder, resolved."""
    return env_setting(EngineSettings, "image_roots", env)


def parse_image_roots(value: str, setting: str = IMAGE_ROOTS) -> tuple[Path, ...]:
    """``"/srv/photos:/mnt/shop"``: each an existing folder, resolved."""
    roots = []
    for entry in filter(None, (e.strip() for e in value.split(os.pathsep))):
        root = Path(entry).expanduser()
        if not root.is_dir():
            raise ConfigError(f"{setting}: {entry!r} is not a folder (separate several with {os.pathsep!r})")
        roots.append(root.resolve())
    return tuple(roots)


def check_device(device: str, setting: str = "FFENGINE_DEVICE") -> str:
    """Accept ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    base = device.split(":", 1)[0]
    if base not in DEVICE_CHOICES or (":" in device and base != "cuda"):
        raise ConfigError(f"{setting} must be one of auto, cpu, cuda, cuda:N, mps; got {device!r}")
    if ":" in device and not device.split(":", 1)[1].isdigit():
        raise ConfigError(f"{setting} must look like cuda:0, got {device!r}")
    return device


RUNTIME_CHOICES = ("auto", "openvino", "onnx", "torch")


#: ``check_runtime(value, setting)``: accept ``auto``, ``openvino``, ``onnx`` or ``torch``.
check_runtime = one_of(*RUNTIME_CHOICES)


@dataclass(frozen=True)
class EngineSettings:
    """What the engine needs: which weights, where the index lives, which device.

    ``data_dir`` holds everything the app writes (database, indexes, model versions,
    embedding cache); ``catalog`` is the store catalogue the index is built from.
    """

    weights: str = setting("FFENGINE_WEIGHTS", DEFAULT_WEIGHTS)
    #: ``False`` when ``weights`` is only the default (no ``FFENGINE_WEIGHTS``, no ``--weights``): then the
    #: weights an index records take its place (:meth:`with_index_weights`).
    weights_chosen: bool = True
    #: Default: ``data_dir / "index"``.
    index_dir: Path = setting("FFENGINE_INDEX", None, parse=lambda raw, _: Path(raw))
    device: str = setting("FFENGINE_DEVICE", "auto", parse=check_device)
    data_dir: Path = setting("FFENGINE_DATA_DIR", Path("data"))
    catalog: Path | None = setting("FFENGINE_CATALOG", None, parse=lambda raw, _: Path(raw))
    #: What computes features on CPU: ``auto`` (OpenVINO, else ONNX Runtime, else PyTorch), or one of them.
    runtime: str = setting("FFENGINE_RUNTIME", "auto", parse=check_runtime)
    #: Read here so that a malformed value stops start-up; the catalogue reader and the importer read the same
    #: variables themselves when not handed them (:func:`env_image_roots`, :func:`env_fetch_allow`,
    #: :func:`env_fetch_deadline`).
    image_roots: tuple[Path, ...] = setting(IMAGE_ROOTS, (), parse=parse_image_roots)
    fetch_allow: FetchAllow = setting(FETCH_ALLOW, FetchAllow(), parse=FetchAllow.parse)
    #: A slow image server must not hold an import for hours: what is not downloaded by then is a skipped row.
    fetch_deadline_s: float = setting(FETCH_DEADLINE, 3600.0)

    def __post_init__(self) -> None:
        if self.index_dir is None:
            object.__setattr__(self, "index_dir", self.data_dir / "index")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineSettings:
        values = read_env(cls, os.environ if env is None else env)
        return cls(**values, weights_chosen="weights" in values)

    def with_index_weights(self, index_dir: Path | None = None) -> EngineSettings:
        """These settings with the weights the index in ``index_dir`` (default: :attr:`index_dir`) was built
        by, unless weights were chosen: an index knows its model, so using it needs no ``--weights``.

        Unchanged when there is no index there or it records no weights file; raises
        :class:`~ffengine.errors.WeightsError` when the recorded file has moved or changed.
        """
        if self.weights_chosen:
            return self
        from ffengine.index import recorded_weights  # numpy and the index code load only when needed

        recorded = recorded_weights(self.index_dir if index_dir is None else index_dir)
        return replace(self, weights=recorded) if recorded else self

    @property
    def cache_dir(self) -> Path:
        """Embedding cache (by image content hash and model fingerprint)."""
        return self.data_dir / "cache"

    @property
    def models_dir(self) -> Path:
        """Model versions produced by ``train/`` (weights + sidecar + index each)."""
        return self.data_dir / "models"


def database_url(env: Mapping[str, str] | None = None) -> str:
    """``DATABASE_URL``, or an SQLite file in the data directory."""
    env = os.environ if env is None else env
    url = env_str(env, "DATABASE_URL")
    if url:
        if "://" not in url:
            raise ConfigError(f"DATABASE_URL must be an SQLAlchemy URL such as sqlite+aiosqlite:///data/ff.db, got {url!r}")
        return url
    data_dir = env_setting(EngineSettings, "data_dir", env)
    return f"sqlite+aiosqlite:///{data_dir / 'focusedfashion.db'}"


def shown_url(url: str) -> str:
    """A database URL as logs and messages may show it: the password as ``***``.

    Raises :class:`ConfigError` when ``url`` is not an SQLAlchemy URL.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        raise ConfigError("DATABASE_URL is not a valid SQLAlchemy URL") from None
