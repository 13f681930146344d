"""Model versions on disk and in the database: where a new one goes, which one answers, rollback.

A version is a row in ``model_versions`` (weights spec + index directory) and, when
``train/`` made it, a folder ``<data_dir>/models/<name>/`` holding its files. Versions
are never deleted by training; switching back is :func:`rollback`. A *rejected* version
(trained, evaluated worse) keeps its row and metrics but not its files, unless
``TRAIN_KEEP_REJECTED=1`` (:func:`keep_rejected`) keeps them to be activated by hand.

Only a version the bot can answer with is registered or switched to (:func:`check_servable`): its index
loads, its weights file is there, and every product in it is one the database stores (the bot stores them
all when it starts or switches). A run promotes its version only while the version it started from is
still the active one (:func:`superseded`): a rollback made meanwhile stands.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffengine.catalog import Product, product_problems
from ffengine.config import EngineSettings, env_str
from ffengine.db import Database, ModelVersion
from ffengine.db.products import product_row
from ffengine.errors import ConfigError
from ffengine.files import write_atomic
from ffengine.index import MANIFEST_FILE, Index, read_manifest, remove_stale_tmp
from ffengine.weights import looks_like_path
from train.errors import TrainingError

#: The version the bot registers on first start from FFENGINE_WEIGHTS and FFENGINE_INDEX.
BASE_VERSION = "base"
METRICS_FILE = "metrics.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: ``1`` keeps the files of rejected versions (see :func:`keep_rejected`).
KEEP_REJECTED_ENV = "TRAIN_KEEP_REJECTED"
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class Current:
    """What answers now: the active version (``None`` if the database has none yet) or the settings' base."""

    version: ModelVersion | None
    weights: str
    index_dir: Path

    @property
    def name(self) -> str:
        return self.version.name if self.version else BASE_VERSION

    @property
    def id(self) -> int | None:
        return self.version.id if self.version else None


def weights_spec(weights: str) -> str:
    """A weights setting as stored in a version: files as absolute paths, torchvision names as they are."""
    return str(Path(weights).expanduser().resolve()) if looks_like_path(weights) else weights


async def register_base(db: Database, weights: str, index_dir: Path, notes: str) -> ModelVersion:
    """Register and activate :data:`BASE_VERSION`: ``weights`` (stored by :func:`weights_spec`) and ``index_dir``."""
    return await db.create_model_version(BASE_VERSION, weights_spec(weights), str(index_dir.resolve()), notes=notes, activate=True)


async def ensure_current(db: Database, settings: EngineSettings) -> Current:
    """The active version; on a database that has none, register the settings' base (as the bot does at start)."""
    active = await db.active_model_version()
    if active is None:
        base = await db.get_model_version(BASE_VERSION)
        if base is not None:
            active = await db.activate_model_version(base.id)
        elif (settings.index_dir / MANIFEST_FILE).is_file():
            active = await register_base(db, settings.weights, settings.index_dir, "registered by train/ from FFENGINE_WEIGHTS and FFENGINE_INDEX")
        else:
            raise TrainingError(f"no active model version and no index at {settings.index_dir.resolve()}; build one with `ffengine index build`")
    return Current(active, active.weights, Path(active.index_dir))


def new_version_name(kind: str, taken: set[str]) -> str:
    """``feedback-20250101-120000`` (UTC), with a suffix if that name is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name, n = f"{kind}-{stamp}", 1
    while name in taken:
        n += 1
        name = f"{kind}-{stamp}-{n}"
    return name


def check_version_name(name: str) -> str:
    if not _NAME.match(name):
        raise TrainingError(f"model version names are 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit); got {name!r}")
    return name


def version_dir(settings: EngineSettings, name: str) -> Path:
    return settings.models_dir / check_version_name(name)


async def claim_version(db: Database, settings: EngineSettings, kind: str, name: str | None) -> tuple[str, Path]:
    """A free version name (``name`` or ``<kind>-<UTC time>``) and its not yet existing folder."""
    taken = {v.name for v in await db.list_model_versions()}
    name = name or new_version_name(kind, taken)
    folder = version_dir(settings, name)
    if name in taken or folder.exists():
        raise TrainingError(f"a model version named {name!r} (or its folder {folder}) already exists; choose another name")
    return name, folder


def keep_rejected(env: Mapping[str, str] | None = None) -> bool:
    """``TRAIN_KEEP_REJECTED``: keep a rejected version's files (its index is as large as the
    active one's) so an admin can still activate it; off by default, its metrics stay in the database."""
    raw = (env_str(os.environ if env is None else env, KEEP_REJECTED_ENV, "0") or "0").lower()
    if raw not in _BOOLEANS:
        raise ConfigError(f"{KEEP_REJECTED_ENV} must be 1 or 0, got {raw!r}")
    return _BOOLEANS[raw]


def remove_version_files(settings: EngineSettings, version: ModelVersion) -> bool:
    """Delete the folder ``train/`` made for ``version`` (only that: never an index registered from
    elsewhere); whether there was one. The row and its metrics stay."""
    folder = version_dir(settings, version.name).resolve()
    if not folder.is_dir() or not Path(version.index_dir).resolve().is_relative_to(folder):
        return False
    shutil.rmtree(folder)
    return True


def remove_partial_writes(settings: EngineSettings) -> list[Path]:
    """Delete the half-written index folders (``models/<name>/index.tmp-*``) of runs that were killed,
    and version folders left empty by that; only call it while holding the training lock."""
    removed: list[Path] = []
    if not settings.models_dir.is_dir():
        return removed
    for folder in settings.models_dir.iterdir():
        if folder.is_dir() and not folder.is_symlink():
            removed += remove_stale_tmp(folder / "index", min_age_s=0)
            if not any(folder.iterdir()):
                folder.rmdir()
                removed.append(folder)
    return removed


def write_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` beside the version's files (atomic), so the folder explains itself."""
    write_atomic(folder / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True, default=str).encode())


def check_loadable(version: ModelVersion) -> None:
    """Refuse to switch to a version the bot could not answer with (:func:`check_servable`)."""
    check_servable(version.name, version.weights, Path(version.index_dir))


def check_servable(name: str, weights: str, index_dir: Path) -> None:
    """Blocking: refuse (an ``FFError``) the version ``name`` when its index is gone or broken (the manifest and
    checksums are read), its weights file is missing, or a product in it is one the database refuses."""
    index = Index.load(index_dir)  # raises IndexLoadError with a clear message
    if looks_like_path(weights) and not Path(weights).is_file():
        raise TrainingError(f"model version {name}: its weights file {weights} is missing")
    check_storable(name, index.products)


def check_storable(name: str, products: Sequence[Product]) -> None:
    """Refuse (:class:`TrainingError`) the products of version ``name`` unless the database stores every one, as
    the bot does when it starts or switches: by the importer's field rules and the database's own checks."""
    bad = [f"product {product.id[:40]!r}: {problem}" for product in products for problem in storage_problems(product)]
    if bad:
        shown = "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
        raise TrainingError(f"model version {name} holds products the database refuses: {shown}; import them anew")


def storage_problems(product: Product) -> list[str]:
    """Why the database would refuse ``product``: the importer's field rules, else the database's own checks."""
    problems = product_problems(product)
    if not problems:
        try:
            product_row(product)
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    return problems


async def superseded(db: Database, parent: Current) -> str | None:
    """Why a version made from ``parent`` must not be activated: another version became active while it was
    made (a rollback, say), which activating it would undo; ``None`` while ``parent`` is still the active one."""
    active = await db.active_model_version()
    if active is not None and active.id == parent.id:
        return None
    now = f"{active.name} is" if active else "none is"
    return f"{parent.name}, which it was made from, is no longer the active version ({now})"


async def rollback(db: Database, name: str) -> ModelVersion:
    """Make ``name`` (a version name or id) the active version again, after checking that it loads."""
    key: int | str = int(name) if name.isdigit() and await db.get_model_version(name) is None else name
    version = await db.get_model_version(key)
    if version is None:
        raise TrainingError(f"no model version {name!r}; `python -m train models` lists them")
    await asyncio.to_thread(check_loadable, version)
    return await db.activate_model_version(version.id)


def describe(version: ModelVersion) -> dict[str, Any]:
    """A JSON-able summary of a version for ``models`` listings."""
    fingerprint = None
    try:
        fingerprint = read_manifest(Path(version.index_dir)).get("fingerprint")
    except Exception:  # noqa: BLE001 - a listing shows what it can; rollback checks properly
        fingerprint = None
    return {
        "id": version.id,
        "name": version.name,
        "active": version.active,
        "parent_id": version.parent_id,
        "created_at": version.created_at.isoformat(),
        "weights": version.weights,
        "index_dir": version.index_dir,
        "fingerprint": fingerprint,
        "metrics": version.metrics or {},
        "notes": version.notes,
    }
