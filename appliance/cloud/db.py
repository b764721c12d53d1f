"""The fleet receiver's database: SQLite for one box's tests, PostgreSQL for a fleet (SQLAlchemy Core).

Exactly-once lives here, in the database, not in Python: (device_id, idempotency_key) is a UNIQUE
constraint and every store is `INSERT ... ON CONFLICT DO NOTHING`, so any number of receiver processes
behind a load balancer, and any number of retries of one item, leave one row. A resumable upload's
chunks are rows too, so a client may send chunk 1 to one process and chunk 2 to another.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine

metadata = MetaData()

devices = Table(
    "devices", metadata,
    Column("device_id", String(128), primary_key=True),
    Column("token_sha256", String(64), unique=True),
    Column("site", Text),
    Column("created_at", Float, nullable=False),
    Column("last_contact", Float),
    Column("last_health", Text),
    Column("last_health_at", Float),
)

items = Table(
    "items", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(128), ForeignKey("devices.device_id"), nullable=False),
    Column("idempotency_key", String(200), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("group_key", String(200)),
    Column("received_at", Float, nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("body", Text),  # JSON items (findings, health)
    Column("blob", LargeBinary),  # de-identified DICOM (SEG, SR)
    UniqueConstraint("device_id", "idempotency_key", name="items_device_key"),
)

uploads = Table(
    "uploads", metadata,
    Column("id", String(40), primary_key=True),
    Column("device_id", String(128), ForeignKey("devices.device_id"), nullable=False),
    Column("idempotency_key", String(200), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("group_key", String(200)),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("received", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("device_id", "idempotency_key", name="uploads_device_key"),
)

chunks = Table(
    "upload_chunks", metadata,
    Column("upload_id", String(40), ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True),
    Column("start", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

JSON_KINDS = ("cloud.finding", "cloud.health")
FILE_KINDS = ("cloud.seg", "cloud.sr")


class ReceiverDBError(RuntimeError):
    """The database URL cannot be used; the message says what to install or fix."""


def engine_for(url: str | None, data_dir: Path) -> Engine:
    """SQLite in the data directory by default; postgresql:// URLs use psycopg 3."""
    if not url:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(data_dir).resolve() / 'receiver.db'}"
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        engine = create_engine(url, pool_pre_ping=True, future=True)
    except ModuleNotFoundError as exc:
        raise ReceiverDBError(f"database URL {url.split('@')[-1]} needs {exc.name}: pip install 'edgescreen[cloud]'")\
            from None
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    return engine


def create_schema(engine: Engine) -> None:
    """Create the tables once, even when several receiver processes start together on one database.
    A database that cannot be reached at all fails at once (retrying cannot help; the caller says what to fix)."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(7012012)"))
                metadata.create_all(conn, checkfirst=True)
            return
        except Exception:  # noqa: BLE001 - a race with another process creating the same table: retry
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def _insert(conn: Connection, table: Table):  # noqa: ANN202
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ReceiverDB:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- devices ------------------------------------------------------------------------------------
    def add_device(self, device_id: str, site: str | None = None) -> str:
        """Register a device (or give it a new token); returns the token, which is stored only as a hash."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self.tx() as conn:
            stmt = _insert(conn, devices).values(device_id=device_id, token_sha256=hash_token(token), site=site,
                                                 created_at=now)
            conn.execute(stmt.on_conflict_do_update(index_elements=["device_id"],
                                                    set_={"token_sha256": hash_token(token), "site": site}))
        return token

    def device_for_token(self, token: str) -> str | None:
        with self.tx() as conn:
            return conn.execute(select(devices.c.device_id).where(devices.c.token_sha256 == hash_token(token))
                                ).scalar_one_or_none()

    def touch(self, conn: Connection, device_id: str, site: str | None = None) -> None:
        """Record contact; an unknown device (allowed with --allow-any-device) is registered without a token."""
        now = time.time()
        conn.execute(_insert(conn, devices).values(device_id=device_id, site=site, created_at=now, last_contact=now)
                     .on_conflict_do_nothing(index_elements=["device_id"]))
        values: dict[str, Any] = {"last_contact": now}
        if site:
            values["site"] = site
        conn.execute(update(devices).where(devices.c.device_id == device_id).values(**values))

    # -- items --------------------------------------------------------------------------------------
    def store_item(self, conn: Connection, device_id: str, key: str, kind: str, group: str | None, *,
                   body: str | None = None, blob: bytes | None = None) -> bool:
        """Insert once; False when (device, key) is already stored (a retry or a duplicate delivery)."""
        raw = blob if blob is not None else (body or "").encode()
        stmt = _insert(conn, items).values(device_id=device_id, idempotency_key=key, kind=kind, group_key=group,
                                           received_at=time.time(), size=len(raw),
                                           sha256=hashlib.sha256(raw).hexdigest(), body=body, blob=blob)
        # RETURNING, not rowcount: drivers report -1 for an INSERT ... ON CONFLICT that returns the new key
        stored = conn.execute(stmt.on_conflict_do_nothing(index_elements=["device_id", "idempotency_key"])
                              .returning(items.c.id)).first() is not None
        if stored and kind == "cloud.health" and body is not None:
            conn.execute(update(devices).where(devices.c.device_id == device_id)
                         .values(last_health=body, last_health_at=time.time()))
        return stored

    def has_item(self, conn: Connection, device_id: str, key: str) -> bool:
        return conn.execute(select(items.c.id).where(items.c.device_id == device_id,
                                                     items.c.idempotency_key == key)).first() is not None

    # -- resumable uploads --------------------------------------------------------------------------
    def open_upload(self, device_id: str, key: str, kind: str, group: str | None, size: int,
                    sha256: str) -> dict[str, Any]:
        """{"status": "duplicate"} when the item is stored already; else the upload and how much it holds."""
        with self.tx() as conn:
            self.touch(conn, device_id)
            if self.has_item(conn, device_id, key):
                return {"status": "duplicate"}
            conn.execute(_insert(conn, uploads).values(
                id=uuid.uuid4().hex, device_id=device_id, idempotency_key=key, kind=kind, group_key=group, size=size,
                sha256=sha256, received=0, created_at=time.time()).on_conflict_do_nothing(
                index_elements=["device_id", "idempotency_key"]))
            row = conn.execute(select(uploads).where(uploads.c.device_id == device_id,
                                                     uploads.c.idempotency_key == key)).mappings().one()
            if row["size"] != size or row["sha256"] != sha256:  # the content changed: start again
                conn.execute(delete(chunks).where(chunks.c.upload_id == row["id"]))
                conn.execute(update(uploads).where(uploads.c.id == row["id"]).values(size=size, sha256=sha256,
                                                                                     received=0))
                return {"status": "open", "upload": row["id"], "offset": 0}
            return {"status": "open", "upload": row["id"], "offset": int(row["received"])}

    def put_chunk(self, device_id: str, upload_id: str, offset: int, data: bytes) -> tuple[bool, int | None]:
        """(accepted, offset now). Not accepted: offset is not where the upload stands (the reply carries where)."""
        with self.tx() as conn:
            row = conn.execute(select(uploads).where(uploads.c.id == upload_id, uploads.c.device_id == device_id)
                               ).mappings().first()
            if row is None:
                return False, None
            if offset != row["received"] or offset + len(data) > row["size"]:
                return False, int(row["received"])
            moved = conn.execute(update(uploads).where(uploads.c.id == upload_id, uploads.c.received == offset)
                                 .values(received=offset + len(data))).rowcount == 1
            if not moved:  # another process stored this chunk meanwhile
                now = conn.execute(select(uploads.c.received).where(uploads.c.id == upload_id)).scalar_one()
                return False, int(now)
            conn.execute(_insert(conn, chunks).values(upload_id=upload_id, start=offset, data=data)
                         .on_conflict_do_nothing(index_elements=["upload_id", "start"]))
            return True, offset + len(data)

    def complete_upload(self, device_id: str, upload_id: str) -> dict[str, Any]:
        with self.tx() as conn:
            row = conn.execute(select(uploads).where(uploads.c.id == upload_id, uploads.c.device_id == device_id)
                               .with_for_update()).mappings().first()
            if row is None:
                return {"status": "unknown"}
            parts = conn.execute(select(chunks.c.start, chunks.c.data).where(chunks.c.upload_id == upload_id)
                                 .order_by(chunks.c.start)).all()
            blob = b"".join(bytes(p.data) for p in parts)
            if len(blob) != row["size"] or hashlib.sha256(blob).hexdigest() != row["sha256"]:
                conn.execute(delete(chunks).where(chunks.c.upload_id == upload_id))
                conn.execute(update(uploads).where(uploads.c.id == upload_id).values(received=0))
                return {"status": "corrupt", "offset": 0}
            stored = self.store_item(conn, device_id, row["idempotency_key"], row["kind"], row["group_key"],
                                     blob=blob)
            conn.execute(delete(chunks).where(chunks.c.upload_id == upload_id))
            conn.execute(delete(uploads).where(uploads.c.id == upload_id))
            return {"status": "stored" if stored else "duplicate"}

    # -- the fleet page -----------------------------------------------------------------------------
    def sites(self, findings_per_site: int = 50) -> list[dict[str, Any]]:
        with self.tx() as conn:
            rows = conn.execute(select(devices).order_by(devices.c.device_id)).mappings().all()
            counts = {(r.device_id, r.kind): r.n for r in conn.execute(
                select(items.c.device_id, items.c.kind, func.count().label("n")).group_by(items.c.device_id,
                                                                                          items.c.kind))}
            out = []
            for d in rows:
                found = conn.execute(select(items.c.body, items.c.received_at, items.c.group_key)
                                     .where(items.c.device_id == d["device_id"], items.c.kind == "cloud.finding")
                                     .order_by(items.c.id.desc()).limit(findings_per_site)).all()
                findings = []
                for f in found:
                    try:
                        body = json.loads(f.body)
                    except (TypeError, ValueError):
                        continue
                    findings.append({**body, "received_at": f.received_at})
                health = json.loads(d["last_health"]) if d["last_health"] else None
                out.append({"device_id": d["device_id"], "site": d["site"], "last_contact": d["last_contact"],
                            "health": health, "health_at": d["last_health_at"], "findings": findings,
                            "counts": {k: counts.get((d["device_id"], k), 0) for k in (*JSON_KINDS, *FILE_KINDS)}})
            return out

    def ping(self) -> None:
        """The health probe's check: the database answers (one trivial query, not a scan of the items)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
