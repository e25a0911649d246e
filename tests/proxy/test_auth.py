"""API keys: hashes, names, the key ring, their settings, and `energy-proxy hash-key`."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.auth import ApiKey, KeyRing, hash_key, make_key, parse_key_spec
from proxy.settings import ConfigError, load_settings

H = hash_key("k1")


def test_a_key_is_its_sha256_with_a_name() -> None:
    assert hashlib.sha256(b"k1").hexdigest() == H
    assert parse_key_spec(f"team-a:{H}") == ApiKey("team-a", bytes.fromhex(H), False)
    assert parse_key_spec(f"ops:{H.upper()}:admin").admin


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("team-a", "NAME:SHA256"),
        (f"team-a:{H}:root", "NAME:SHA256"),
        ("team-a:abc", "64 hex digits"),
        (f"bad name:{H}", "letters, digits"),
        (f"{'n' * 65}:{H}", "letters, digits"),
    ],
)
def test_bad_key_specs_are_refused_without_echoing_the_hash(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as exc:
        parse_key_spec(spec)
    assert H not in str(exc.value)


def test_the_ring_identifies_a_bearer_key_and_nothing_else() -> None:
    ring = KeyRing([make_key("a", hash_key("ka")), make_key("b", hash_key("kb"), admin=True)])
    assert ring.enabled and ring.names == ("a", "b")
    assert ring.identify(b"Bearer ka").name == "a"  # type: ignore[union-attr]
    assert ring.identify(b"bearer   kb  ").admin  # type: ignore[union-attr]
    for header in (None, b"", b"Bearer", b"Basic ka", b"Bearer kc", b"ka"):
        assert ring.identify(header) is None
    assert not KeyRing().enabled and KeyRing().identify(b"Bearer ka") is None
    with pytest.raises(ValueError, match="same name"):
        KeyRing([make_key("a", hash_key("x")), make_key("a", hash_key("y"))])
    with pytest.raises(ValueError, match="same hash"):
        KeyRing([make_key("a", hash_key("x")), make_key("b", hash_key("x"))])


def test_plain_api_keys_are_admin_keys() -> None:
    ring = KeyRing.from_settings(["p1", "p2"], [make_key("t", H)])
    assert ring.names == ("admin", "admin-2", "t")
    assert ring.identify(b"Bearer p2").admin  # type: ignore[union-attr]
    assert not ring.identify(b"Bearer k1").admin  # type: ignore[union-attr]


def test_keys_from_the_file_the_environment_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[keys]]\nname = "file-tenant"\nsha256 = "{H}"\n')
    s = load_settings({"config": str(cfg)}, {})
    assert [k.name for k in s.keys] == ["file-tenant"]
    s = load_settings({}, {"ENERGY_PROXY_KEY_HASH": f"a:{H},b:{hash_key('k2')}:admin"})
    assert [(k.name, k.admin) for k in s.keys] == [("a", False), ("b", True)]
    s = load_settings({"key_hash": [f"c:{H}"]}, {})
    assert [k.name for k in s.keys] == ["c"]
    with pytest.raises(ConfigError, match="admin key"):
        load_settings({"key_hash": [f"c:{H}"], "protect_metrics": True}, {})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_settings({"metrics_listen": "9100"}, {})
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[[keys]]\nname = "x"\nsha256 = "{H}"\nrole = "admin"\n')
    with pytest.raises(ConfigError, match="name, sha256, admin"):
        load_settings({"config": str(bad)}, {})


def hash_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "hash-key", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_hash_key_reads_the_key_from_stdin_never_argv() -> None:
    done = hash_cli("--name", "team-a", stdin="k1\n")
    assert done.returncode == 0 and done.stdout.strip() == f"team-a:{H}"
    assert f'sha256 = "{H}"' in done.stderr  # the config snippet
    admin = hash_cli("--name", "ops", "--admin", stdin="k1\n")
    assert admin.stdout.strip() == f"ops:{H}:admin"
    new = hash_cli("--new", "--name", "t")
    key = new.stderr.split("it is not stored anywhere): ")[1].split()[0]
    assert key.startswith("ep-") and new.stdout.strip() == f"t:{hash_key(key)}"
    assert hash_cli(stdin="").returncode == 2
    assert hash_cli("--name", "bad name", stdin="k\n").returncode == 2
