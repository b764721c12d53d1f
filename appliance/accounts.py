"""Users, passwords, API tokens and the login rate limit: who may see patient data on the clinic LAN.

Passwords are hashed with Argon2id at OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): on a
box whose cores belong to inference, a login must not cost a second of CPU, and a flood of them must
not starve the worker; a hash made with other parameters is re-hashed at the next successful login. A generated password is 4 groups of 4 from an alphabet without look-alike characters, so a
technician can read it off a terminal and type it on a tablet. API tokens are 32 random bytes: the
store keeps only their SHA-256 (a token has full entropy, so a fast hash is safe and lets a request be
checked in one indexed lookup); the plain token is shown once. Every change is audited, in the same
transaction as the change itself.

The rate limit counts failed logins per account and per address over a window: a guesser on the LAN
is slowed down without a lock-out that a typo-prone colleague could trigger for everyone.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from edgescreen.appliance.store import Store

ROLES = ("clinician", "technician", "admin")
ROLE_HELP = {
    "clinician": "worklist, study results, mark reviewed, urgent / run-now",
    "technician": "clinician rights + scheduler pause/resume, scanner switch, retry, upload, quarantine view",
    "admin": "everything, including users, quarantine retry/delete and the audit log",
}
FIRST_ADMIN = "admin"
MIN_PASSWORD_LENGTH = 10
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

# rate limit: failures inside the window before further attempts are refused until the window moves on
WINDOW_S = 15 * 60
MAX_FAILURES_PER_ACCOUNT = 5
MAX_FAILURES_PER_ADDRESS = 20

TOKEN_PREFIX = "est_"
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read off a screen, typed on a tablet
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
# verified against when the user does not exist, so a wrong name costs as long as a wrong password
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class AccountError(ValueError):
    """A refused account change; the message says what to do instead."""


@dataclass(frozen=True)
class User:
    username: str
    role: str
    must_change_password: bool
    locale: str | None

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS[self.role]


# what each role may do; the web blueprints check these names, never role strings
PERMISSIONS: dict[str, frozenset[str]] = {
    "clinician": frozenset({"view", "review", "prioritise"}),
    "technician": frozenset({"view", "review", "prioritise", "operate", "upload", "quarantine.view"}),
    "admin": frozenset({"view", "review", "prioritise", "operate", "upload", "quarantine.view", "quarantine.manage",
                        "users", "audit"}),
}


def generate_password() -> str:
    return "-".join("".join(secrets.choice(_ALPHABET) for _ in range(4)) for _ in range(4))


def _check_username(username: str) -> str:
    if not USERNAME_RE.match(username or ""):
        raise AccountError(f"user name {username!r}: use 1-64 letters, digits, '.', '_', '@' or '-', "
                           "starting with a letter or digit")
    return username


def check_password_policy(username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    if password.strip().lower() == username.lower():
        raise AccountError("the password must not be the user name")


def _row(store: Store, username: str, conn=None):
    sql = "SELECT * FROM users WHERE username = ?"
    return (conn.execute(sql, (username,)).fetchone() if conn is not None else store.query_one(sql, (username,)))


def get_user(store: Store, username: str) -> User | None:
    row = _row(store, username)
    if row is None or row["disabled"]:
        return None
    return User(row["username"], row["role"], bool(row["must_change_password"]), row["locale"])


def create_user(store: Store, username: str, role: str, password: str | None = None, *, actor: str,
                must_change: bool | None = None) -> str:
    """Create a user; returns the password (generated when None, then to be changed at first login)."""
    _check_username(username)
    if role not in ROLES:
        raise AccountError(f"role {role!r}: use one of {', '.join(ROLES)}")
    generated = password is None
    password = generate_password() if generated else password
    check_password_policy(username, password)
    must_change = generated if must_change is None else must_change
    now = time.time()
    digest = _hasher.hash(password)
    with store.transaction() as conn:
        if _row(store, username, conn) is not None:
            raise AccountError(f"user {username!r} already exists; use reset-password or pick another name")
        conn.execute("INSERT INTO users (username, role, password_hash, created_at, must_change_password, "
                     "password_changed_at) VALUES (?, ?, ?, ?, ?, ?)",
                     (username, role, digest, now, int(must_change), now))
        store.audit(actor, "user.create", username, f"role={role}", conn=conn)
    return password


def ensure_first_admin(store: Store) -> str | None:
    """On a box with no user at all, create `admin` with a one-time password and return it (print it once).

    Returns None when any user exists. The admin must choose a new password at first login.
    """
    with store.transaction() as conn:
        if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None:
            return None
        password = generate_password()
        now = time.time()
        conn.execute("INSERT INTO users (username, role, password_hash, created_at, must_change_password, "
                     "password_changed_at) VALUES (?, 'admin', ?, ?, 1, ?)",
                     (FIRST_ADMIN, _hasher.hash(password), now, now))
        store.audit("system", "user.create", FIRST_ADMIN, "first-run admin, one-time password", conn=conn)
    return password


def list_users(store: Store) -> list[dict]:
    rows = store.query("""SELECT u.username, u.role, u.disabled, u.must_change_password, u.created_at,
                                 u.last_login_at, u.locale,
                                 (SELECT COUNT(*) FROM api_tokens t WHERE t.username = u.username
                                                                    AND t.revoked_at IS NULL) AS tokens
                          FROM users u ORDER BY u.username""")
    return [{**dict(r), "disabled": bool(r["disabled"]), "must_change_password": bool(r["must_change_password"])}
            for r in rows]


def _admins_left(conn, excluding: str) -> int:
    return conn.execute("SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0 AND username != ?",
                        (excluding,)).fetchone()[0]


def disable_user(store: Store, username: str, *, actor: str, disabled: bool = True) -> None:
    """Disable (or re-enable) a user: their sessions and tokens stop working at the next request."""
    with store.transaction() as conn:
        row = _row(store, username, conn)
        if row is None:
            raise AccountError(f"no user {username!r} (see `edgescreen users list`)")
        if disabled and row["role"] == "admin" and _admins_left(conn, username) == 0:
            raise AccountError(f"{username!r} is the last enabled admin; create another admin first")
        conn.execute("UPDATE users SET disabled = ? WHERE username = ?", (int(disabled), username))
        store.audit(actor, "user.disable" if disabled else "user.enable", username, conn=conn)


def set_role(store: Store, username: str, role: str, *, actor: str) -> None:
    if role not in ROLES:
        raise AccountError(f"role {role!r}: use one of {', '.join(ROLES)}")
    with store.transaction() as conn:
        row = _row(store, username, conn)
        if row is None:
            raise AccountError(f"no user {username!r}")
        if row["role"] == "admin" and role != "admin" and _admins_left(conn, username) == 0:
            raise AccountError(f"{username!r} is the last enabled admin; make another user admin first")
        conn.execute("UPDATE users SET role = ? WHERE username = ?", (role, username))
        store.audit(actor, "user.role", username, f"{row['role']} -> {role}", conn=conn)


def reset_password(store: Store, username: str, password: str | None = None, *, actor: str) -> str:
    """Set a new password (generated when None); the user must change it at next login. Returns it."""
    password = generate_password() if password is None else password
    check_password_policy(username, password)
    now = time.time()
    with store.transaction() as conn:
        if _row(store, username, conn) is None:
            raise AccountError(f"no user {username!r} (see `edgescreen users list`)")
        conn.execute("UPDATE users SET password_hash = ?, must_change_password = 1, password_changed_at = ? "
                     "WHERE username = ?", (_hasher.hash(password), now, username))
        # a reset also clears the account's lock-out: the admin has just verified who is asking
        conn.execute("DELETE FROM login_attempts WHERE username = ? AND ok = 0", (username,))
        store.audit(actor, "user.reset_password", username, conn=conn)
    return password


def change_password(store: Store, username: str, old: str, new: str) -> None:
    """The user's own change (first login, or later): needs the current password."""
    row = _row(store, username)
    if row is None or row["disabled"] or not _verify(row["password_hash"], old):
        raise AccountError("the current password is not correct")
    if new == old:
        raise AccountError("choose a password different from the current one")
    check_password_policy(username, new)
    with store.transaction() as conn:
        conn.execute("UPDATE users SET password_hash = ?, must_change_password = 0, password_changed_at = ? "
                     "WHERE username = ?", (_hasher.hash(new), time.time(), username))
        store.audit(username, "user.change_password", username, conn=conn)


def set_locale(store: Store, username: str, locale: str | None) -> None:
    with store.transaction() as conn:
        conn.execute("UPDATE users SET locale = ? WHERE username = ?", (locale, username))


def _verify(digest: str | None, password: str) -> bool:
    try:
        return bool(digest) and _hasher.verify(digest, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# -- login and its rate limit ------------------------------------------------------------------------
@dataclass(frozen=True)
class LoginResult:
    user: User | None
    reason: str  # "ok", "bad_credentials", "rate_limited_account", "rate_limited_address", "disabled"
    retry_after_s: int = 0


def _failures(conn, column: str, value: str, since: float) -> tuple[int, float | None]:
    row = conn.execute(f"SELECT COUNT(*), MIN(ts) FROM login_attempts WHERE {column} = ? AND ts > ? AND ok = 0",
                       (value, since)).fetchone()
    return int(row[0]), row[1]


def authenticate(store: Store, username: str, password: str, address: str, *, now: float | None = None) -> LoginResult:
    """Check a login, counting it for the rate limit and auditing success and failure.

    Refused while the account has MAX_FAILURES_PER_ACCOUNT failures, or the address
    MAX_FAILURES_PER_ADDRESS, inside the last WINDOW_S; the password is not even checked then, so a
    guesser learns nothing from a locked window.
    """
    now = time.time() if now is None else now
    username = (username or "").strip()[:64]
    since = now - WINDOW_S
    conn = store.connect()
    n_acc, first_acc = _failures(conn, "username", username, since)
    n_addr, first_addr = _failures(conn, "address", address, since)
    if n_acc >= MAX_FAILURES_PER_ACCOUNT or n_addr >= MAX_FAILURES_PER_ADDRESS:
        per_account = n_acc >= MAX_FAILURES_PER_ACCOUNT
        first = first_acc if per_account else first_addr
        retry = max(1, int((first or now) + WINDOW_S - now))
        reason = "rate_limited_account" if per_account else "rate_limited_address"
        store.audit(username or "-", "login.refused", username or None, f"{reason} from {address}")
        return LoginResult(None, reason, retry)
    row = _row(store, username)
    ok = _verify(row["password_hash"] if row else _DUMMY_HASH, password) and row is not None
    disabled = bool(row and row["disabled"])
    with store.transaction() as tx:
        tx.execute("INSERT INTO login_attempts (ts, username, address, ok) VALUES (?, ?, ?, ?)",
                   (now, username, address, int(ok and not disabled)))
        tx.execute("DELETE FROM login_attempts WHERE ts < ?", (now - 7 * 86400,))  # keeps the table small
        if ok and not disabled:
            tx.execute("UPDATE users SET last_login_at = ? WHERE username = ?", (now, username))
            if _hasher.check_needs_rehash(row["password_hash"]):
                tx.execute("UPDATE users SET password_hash = ? WHERE username = ?", (_hasher.hash(password), username))
            store.audit(username, "login.success", username, f"from {address}", conn=tx)
        else:
            why = "disabled account" if (ok and disabled) else "wrong user name or password"
            store.audit(username or "-", "login.failure", username or None, f"{why} from {address}", conn=tx)
    if not ok:
        return LoginResult(None, "bad_credentials")
    if disabled:
        return LoginResult(None, "disabled")
    return LoginResult(User(row["username"], row["role"], bool(row["must_change_password"]), row["locale"]), "ok")


# -- API tokens -------------------------------------------------------------------------------------
def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def create_token(store: Store, username: str, name: str, *, actor: str) -> str:
    """A new API token for `username`; returns the plain token (shown once, never stored)."""
    name = (name or "").strip()[:80]
    if not name:
        raise AccountError("give the token a name that says what uses it (for example 'pacs-report-script')")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.transaction() as conn:
        row = _row(store, username, conn)
        if row is None or row["disabled"]:
            raise AccountError(f"no enabled user {username!r}")
        cur = conn.execute("INSERT INTO api_tokens (username, name, token_hash, created_at) VALUES (?, ?, ?, ?)",
                           (username, name, _token_hash(token), time.time()))
        store.audit(actor, "token.create", username, f"token {cur.lastrowid} {name!r}", conn=conn)
    return token


def list_tokens(store: Store, username: str | None = None) -> list[dict]:
    sql = "SELECT id, username, name, created_at, last_used_at, revoked_at FROM api_tokens"
    rows = store.query(sql + (" WHERE username = ? ORDER BY id" if username else " ORDER BY id"),
                       (username,) if username else ())
    return [dict(r) for r in rows]


def revoke_token(store: Store, token_id: int, *, actor: str, owner: str | None = None) -> None:
    """Revoke a token; with `owner`, only one of that user's own."""
    with store.transaction() as conn:
        sql = "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
        params: tuple = (time.time(), token_id)
        if owner is not None:
            sql += " AND username = ?"
            params += (owner,)
        if conn.execute(sql, params).rowcount != 1:
            raise AccountError(f"no active token {token_id}")
        store.audit(actor, "token.revoke", str(token_id), conn=conn)


def user_for_token(store: Store, token: str) -> User | None:
    """The enabled user a presented token belongs to, or None (unknown, revoked, or its user disabled)."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = store.query_one("""SELECT t.id, t.last_used_at, u.username, u.role, u.must_change_password, u.locale
                             FROM api_tokens t JOIN users u ON u.username = t.username
                             WHERE t.token_hash = ? AND t.revoked_at IS NULL AND u.disabled = 0""",
                          (_token_hash(token),))
    if row is None:
        return None
    now = time.time()
    if row["last_used_at"] is None or now - row["last_used_at"] > 60:  # a write per minute, not per request
        with store.transaction() as conn:
            conn.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, row["id"]))
    # a token's user is never forced through the change-password page: scripts cannot answer it
    return User(row["username"], row["role"], False, row["locale"])
