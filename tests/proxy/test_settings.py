"""Flag > environment > config file > default, and clear errors for bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.settings import DEFAULT_CARBON_INTENSITY_G_PER_KWH, ConfigError, load_settings


def test_defaults() -> None:
    s = load_settings({}, {})
    assert s.port == 8080 and s.host == "127.0.0.1"
    assert s.power_source == "auto" and s.sample_hz == 20.0
    assert s.idle_watts == "auto" and s.idle_watts_fixed is None
    assert s.carbon_intensity == DEFAULT_CARBON_INTENSITY_G_PER_KWH
    assert "other" in s.categories and "sql" in s.categories


def test_precedence_flag_env_file(tmp_path: Path) -> None:
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        'port = 9000\nsample-hz = 5\npower_source = "constant:10"\n'
        '[[backends]]\nname = "vllm"\nurl = "http://gpu-host:8000/"\ngpus = [0, 1]\n'
    )
    env = {"ENERGY_PROXY_PORT": "9100", "ENERGY_PROXY_SAMPLE_HZ": "10"}
    s = load_settings({"config": str(cfg), "port": 9200}, env)
    assert s.port == 9200  # flag beats env and file
    assert s.sample_hz == 10.0  # env beats file
    assert s.power_source == "constant:10"  # file beats default
    assert s.backends[0].name == "vllm" and s.backends[0].url == "http://gpu-host:8000"
    assert s.backends[0].gpus == [0, 1]
    # a --backend flag replaces the file's backends
    s2 = load_settings({"config": str(cfg), "backend": ["a=http://x:1", "http://y:2"]}, {})
    assert [(b.name, b.url) for b in s2.backends] == [
        ("a", "http://x:1"),
        ("backend-2", "http://y:2"),
    ]


def test_env_backend_list_and_config_from_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("idle-watts = 55\n")
    s = load_settings(
        {}, {"ENERGY_PROXY_BACKEND": "a=http://h:1,b=http://h:2", "ENERGY_PROXY_CONFIG": str(cfg)}
    )
    assert [b.name for b in s.backends] == ["a", "b"]
    assert s.idle_watts_fixed == 55.0


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"backend": ["ftp://x"]}, "http://"),
        ({"backend": ["a=http://x:1", "a=http://x:2"]}, "unique"),
        ({"idle_watts": "lots"}, "idle-watts"),
        ({"sample_hz": 0}, "sample-hz"),
        ({"attribution": "random"}, "attribution"),
        ({"categories": "code,sql"}, "other"),
        ({"pue": 0.5}, "pue"),
    ],
)
def test_bad_settings_are_clear_errors(flags: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(flags, {})


def test_errors_name_the_flag_the_user_wrote() -> None:
    """--backend (as typed), not the field's path (--backends.url)."""
    with pytest.raises(ConfigError) as raised:
        load_settings({"backend": ["localhost:8000"]}, {})
    assert str(raised.value) == (
        "invalid settings: --backend: backend url must start with http:// or https://, "
        "got 'localhost:8000'"
    )
    with pytest.raises(ConfigError, match=r"^invalid settings: --key-hash: "):
        load_settings({"key_hash": ["nohash"]}, {})


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({"config": str(tmp_path / "missing.toml")}, {})
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"config": str(bad)}, {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'green'")
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_settings({"config": str(unknown)}, {})


def test_a_backends_max_running_sets_its_queue_models_capacity(tmp_path: Path) -> None:
    from proxy.app import create_app

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'db = "{tmp_path / "r.db"}"\npower-source = "constant:10"\n'
        '[[backends]]\nname = "vllm"\nurl = "http://127.0.0.1:1"\nmax_running = 12\n'
        "prefill_chunk_tokens = 2048\n"
        '[[backends]]\nname = "other"\nurl = "http://127.0.0.1:2"\n'
    )
    s = load_settings({"config": str(cfg)}, {})
    assert s.attribution == "model"  # the default
    app = create_app(s)
    assert app.meter.lane("vllm").queue.capacity == 12
    assert app.meter.lane("other").queue.capacity is None
    views = app.meter.cost_models()
    assert views["vllm"]["prefill_chunk_tokens"] == 2048.0
    assert views["vllm"]["prefill_chunk_source"] == "configured"
    assert views["other"]["prefill_chunk_source"] == "none"
    app.meter.sampler.close()
    app.store.close()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[backends]]\nname = "x"\nurl = "http://127.0.0.1:1"\nmax_running = 0\n')
    with pytest.raises(
        ConfigError, match="max-running: Input should be greater than or equal to 1"
    ):
        load_settings({"config": str(bad)}, {})
    bad.write_text(
        '[[backends]]\nname = "x"\nurl = "http://127.0.0.1:1"\nprefill_chunk_tokens = -5\n'
    )
    with pytest.raises(ConfigError, match="prefill-chunk-tokens: Input should be greater"):
        load_settings({"config": str(bad)}, {})


def test_routing_settings_are_checked() -> None:
    two = ["a=http://127.0.0.1:1", "b=http://127.0.0.1:2"]
    with pytest.raises(ConfigError, match="--route: a routing policy is one of"):
        load_settings({"backend": two, "route": "cheapest"}, {})
    with pytest.raises(ConfigError, match="pass-backend-metrics takes one backend"):
        load_settings({"backend": two, "pass_backend_metrics": True}, {})
    zoned = [{"name": "a", "url": "http://127.0.0.1:1", "carbon_zone": "FR"}]
    with pytest.raises(ConfigError, match="carbon_zone needs an Electricity Maps API key"):
        load_settings({"backend": zoned}, {})
    both = [{"name": "a", "url": "http://127.0.0.1:1", "carbon_zone": "FR",
             "carbon_intensity": 50.0}]  # fmt: skip
    with pytest.raises(ConfigError, match="not both"):
        load_settings({"backend": both}, {"ELECTRICITYMAPS_API_KEY": "k"})
    routes = load_settings({"backend": two}, {"ENERGY_PROXY_ROUTES": "m1=Least-Loaded,m2=first"})
    assert routes.routes == {"m1": "least-loaded", "m2": "first"}
    with pytest.raises(ConfigError, match="routes: m1"):
        load_settings({"backend": two}, {"ENERGY_PROXY_ROUTES": "m1=fastest"})


def test_a_backend_name_is_ascii_it_goes_in_a_header() -> None:
    with pytest.raises(ConfigError, match="ASCII letters"):
        load_settings({"backend": ["名前=http://127.0.0.1:1"]}, {})
    with pytest.raises(ConfigError, match="carbon-intensity"):
        load_settings({"backend": ["a=http://127.0.0.1:1"], "carbon_intensity": "inf"}, {})
