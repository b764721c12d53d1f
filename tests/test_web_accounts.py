"""Accounts: Argon2 hashes, the first-run admin, the rate limit, API tokens, and the `users` command.

Why: the web UI shows patient names on the clinic LAN; these are the rules that keep a guesser, a
leaked token or a departed colleague out, and every change must be in the audit log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgescreen.appliance import accounts
from edgescreen.appliance.store import Store
from tests.conftest import run_cli


@pytest.fixture
def store(data_dir: Path) -> Store:
    return Store(data_dir)


def _audit(store: Store) -> list[tuple]:
    return [(r["actor"], r["action"], r["target"]) for r in store.query("SELECT * FROM audit ORDER BY id")]


def test_passwords_are_argon2_hashed_and_checked(store: Store) -> None:
    pw = accounts.create_user(store, "amina", "clinician", "a long secret 1", actor="test")
    assert pw == "a long secret 1"
    row = store.query_one("SELECT password_hash, must_change_password FROM users WHERE username = 'amina'")
    assert row["password_hash"].startswith("$argon2id$") and "a long secret" not in row["password_hash"]
    assert row["must_change_password"] == 0
    assert accounts.authenticate(store, "amina", "a long secret 1", "10.0.0.5").reason == "ok"
    assert accounts.authenticate(store, "amina", "a long secret 2", "10.0.0.5").reason == "bad_credentials"
    assert accounts.authenticate(store, "nobody", "a long secret 1", "10.0.0.5").reason == "bad_credentials"
    actions = [a[1] for a in _audit(store)]
    assert actions == ["user.create", "login.success", "login.failure", "login.failure"]


def test_generated_password_must_be_changed(store: Store) -> None:
    pw = accounts.create_user(store, "tech1", "technician", actor="test")
    assert len(pw) == 19 and pw.count("-") == 3
    result = accounts.authenticate(store, "tech1", pw, "127.0.0.1")
    assert result.user is not None and result.user.must_change_password
    with pytest.raises(accounts.AccountError, match="at least"):
        accounts.change_password(store, "tech1", pw, "short")
    with pytest.raises(accounts.AccountError, match="current password"):
        accounts.change_password(store, "tech1", "wrong", "a new long password")
    accounts.change_password(store, "tech1", pw, "a new long password")
    assert not accounts.authenticate(store, "tech1", "a new long password", "127.0.0.1").user.must_change_password


def test_policy_and_names(store: Store) -> None:
    with pytest.raises(accounts.AccountError, match="role"):
        accounts.create_user(store, "x", "staff", "a long secret 1", actor="t")
    with pytest.raises(accounts.AccountError, match="user name"):
        accounts.create_user(store, "bad name", "admin", "a long secret 1", actor="t")
    with pytest.raises(accounts.AccountError, match="user name"):
        accounts.create_user(store, "clinician.one", "admin", "clinician.one", actor="t")
    accounts.create_user(store, "dup", "admin", "a long secret 1", actor="t")
    with pytest.raises(accounts.AccountError, match="already exists"):
        accounts.create_user(store, "dup", "admin", "a long secret 1", actor="t")


def test_first_admin_once(store: Store) -> None:
    pw = accounts.ensure_first_admin(store)
    assert pw is not None
    assert accounts.ensure_first_admin(store) is None  # printed once, never again
    user = accounts.authenticate(store, "admin", pw, "127.0.0.1").user
    assert user.role == "admin" and user.must_change_password


def test_last_admin_cannot_be_disabled_or_demoted(store: Store) -> None:
    accounts.create_user(store, "boss", "admin", "a long secret 1", actor="t")
    with pytest.raises(accounts.AccountError, match="last enabled admin"):
        accounts.disable_user(store, "boss", actor="t")
    with pytest.raises(accounts.AccountError, match="last enabled admin"):
        accounts.set_role(store, "boss", "clinician", actor="t")
    accounts.create_user(store, "boss2", "admin", "a long secret 1", actor="t")
    accounts.disable_user(store, "boss", actor="t")
    assert accounts.authenticate(store, "boss", "a long secret 1", "127.0.0.1").reason == "disabled"
    assert accounts.get_user(store, "boss") is None


def test_rate_limit_per_account_and_per_address(store: Store) -> None:
    accounts.create_user(store, "nurse", "clinician", "the right password", actor="t")
    t0 = 1_000_000.0
    for i in range(accounts.MAX_FAILURES_PER_ACCOUNT):
        assert accounts.authenticate(store, "nurse", f"guess {i}", "10.1.1.1", now=t0 + i).reason == "bad_credentials"
    # locked: even the right password is refused, from any address, until the window moves on
    locked = accounts.authenticate(store, "nurse", "the right password", "10.9.9.9", now=t0 + 10)
    assert locked.reason == "rate_limited_account" and locked.user is None and locked.retry_after_s > 800
    assert accounts.authenticate(store, "nurse", "the right password", "10.9.9.9",
                                 now=t0 + accounts.WINDOW_S + 5).reason == "ok"
    # per address: many accounts guessed from one machine
    for i in range(accounts.MAX_FAILURES_PER_ADDRESS):
        accounts.authenticate(store, f"user{i}", "x", "10.2.2.2", now=t0 + 2000 + i)
    assert accounts.authenticate(store, "nurse", "the right password", "10.2.2.2",
                                 now=t0 + 2030).reason == "rate_limited_address"
    assert accounts.authenticate(store, "nurse", "the right password", "10.3.3.3", now=t0 + 2030).reason == "ok"
    # an admin's reset clears the account's lock
    for i in range(accounts.MAX_FAILURES_PER_ACCOUNT):
        accounts.authenticate(store, "nurse", "bad", "10.4.4.4", now=t0 + 3000 + i)
    new = accounts.reset_password(store, "nurse", actor="admin")
    assert accounts.authenticate(store, "nurse", new, "10.4.4.4", now=t0 + 3010).reason == "ok"


def test_api_tokens_hashed_revocable_and_die_with_their_user(store: Store) -> None:
    accounts.create_user(store, "script", "technician", "a long secret 1", actor="t")
    accounts.create_user(store, "root2", "admin", "a long secret 1", actor="t")
    token = accounts.create_token(store, "script", "ris export", actor="root2")
    assert token.startswith("est_") and len(token) > 40
    assert store.query_one("SELECT COUNT(*) FROM api_tokens WHERE token_hash = ?", (token,))[0] == 0
    assert accounts.user_for_token(store, token).username == "script"
    assert accounts.user_for_token(store, token + "x") is None
    tid = accounts.list_tokens(store, "script")[0]["id"]
    with pytest.raises(accounts.AccountError):
        accounts.revoke_token(store, tid, actor="root2", owner="root2")  # not theirs
    accounts.disable_user(store, "script", actor="root2")
    assert accounts.user_for_token(store, token) is None
    accounts.disable_user(store, "script", actor="root2", disabled=False)
    assert accounts.user_for_token(store, token) is not None
    accounts.revoke_token(store, tid, actor="root2")
    assert accounts.user_for_token(store, token) is None
    assert ("root2", "token.revoke", str(tid)) in _audit(store)


def test_old_roles_migrate(tmp_path: Path) -> None:
    """A box that had users under schema 2 keeps them, with staff/radiologist mapped to clinician."""
    import sqlite3

    from edgescreen.appliance.store.migrations import MIGRATIONS

    db = tmp_path / "edgescreen.db"
    conn = sqlite3.connect(db)
    for sql in MIGRATIONS[0].split(";") + MIGRATIONS[1].split(";"):
        if sql.strip():
            conn.execute(sql)
    conn.execute("PRAGMA user_version = 2")
    conn.executemany("INSERT INTO users VALUES (?, ?, NULL, 0)", [("r", "radiologist"), ("s", "staff"), ("a", "admin")])
    conn.commit()
    conn.close()
    store = Store(tmp_path)
    assert {u["username"]: u["role"] for u in accounts.list_users(store)} == {"a": "admin", "r": "clinician",
                                                                           "s": "clinician"}


def test_users_command(data_dir: Path, tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("王小明的密码 long enough\n", encoding="utf-8")
    out = run_cli("users", "add", "wang", "--role", "admin", "--password-file", str(pw_file), data_dir=data_dir,
                  check=True)
    assert "created" in out.stdout and "long enough" not in out.stdout
    gen = run_cli("users", "add", "abebe", "--role", "clinician", data_dir=data_dir, check=True).stdout
    one_time = gen.rsplit(": ", 1)[1].strip()
    listed = run_cli("users", "list", "--json", data_dir=data_dir, check=True).stdout
    assert '"abebe"' in listed and '"must_change_password": true' in listed
    refused = run_cli("users", "disable", "wang", data_dir=data_dir)
    assert refused.returncode == 2 and "last enabled admin" in refused.stderr
    assert run_cli("users", "add", "x", "--role", "staff", data_dir=data_dir).returncode == 2
    store = Store(data_dir)
    assert accounts.authenticate(store, "wang", "王小明的密码 long enough", "127.0.0.1").reason == "ok"
    assert accounts.authenticate(store, "abebe", one_time, "127.0.0.1").reason == "ok"
    assert [a[1] for a in _audit(store) if a[0].startswith("cli:")] == ["user.create", "user.create"]
