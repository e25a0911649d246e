"""Settings: one pydantic model, filled from flags, the environment and a TOML file.

Precedence is flag > environment (`ENERGY_PROXY_<FLAG>`) > config file > default, as
docs/INTERFACE.md fixes. Every default that is a number about the world says where it is from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from backends.backend import BackendConfig
from backends.choice import DEFAULT_EXPLORE, DEFAULT_MAX_WAITING, MEASURED, POLICIES
from backends.kinds import AUTO, KIND_NAMES
from metering.carbon.sci import DEFAULT_LIFESPAN_YEARS
from metering.categories.classifier import DEFAULT_CATEGORIES
from metering.store.window import DEFAULT_WINDOW, parse_duration_s
from proxy.auth import ApiKey, KeyRing, make_key, parse_key_spec
from proxy.budgets import Budget, parse_budget
from proxy.relay.path_rules import check_patterns

# World average carbon intensity of electricity generation in 2023: 480 gCO2eq/kWh
# (Ember, "Global Electricity Review 2024"). Used until a zone is configured.
DEFAULT_CARBON_INTENSITY_G_PER_KWH = 480.0


def default_db_path(env: Mapping[str, str] | None = None) -> str:
    """`$XDG_STATE_HOME/energy-proxy/requests.db`, by default `~/.local/state/...`
    (the XDG Base Directory place for state that should survive restarts)."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "energy-proxy" / "requests.db")


class ConfigError(ValueError):
    """Settings that cannot be used; the message says which and why."""


class BackendEntry(BaseModel):
    """One backend as the config file, the environment or `--backend` give it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    url: str
    kind: str = "auto"
    api_key: str | None = Field(default=None, repr=False)
    gpus: list[int] | None = None
    # The most requests it runs at once (vLLM --max-num-seqs): the queue model's capacity
    # when the backend's metrics do not tell it (metering/accounting/attribution.py).
    max_running: int | None = Field(default=None, ge=1)
    # The tokens it runs in one step across requests, prompts' and decoding sequences'
    # (vLLM --max-num-batched-tokens, chunked prefill): the split prices a prompt by the
    # chunks it runs in; learnt from the streams where not given.
    prefill_chunk_tokens: int | None = Field(default=None, ge=1)
    # Pass the client's own Authorization header on to this backend (never by default:
    # the client's key is for the proxy).
    forward_authorization: bool = False
    # Where its power comes from, when not where the proxy's is (hosts in several grid
    # zones): an Electricity Maps zone, or a static gCO2eq/kWh. Its answers carry this
    # figure, and the `carbon` routing policy weighs its energy by it.
    carbon_zone: str | None = None
    carbon_intensity: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)

    def to_config(self) -> BackendConfig:
        """The registry's frozen configuration of this backend."""
        return BackendConfig(
            name=self.name,
            url=self.url,
            kind=self.kind,
            api_key=self.api_key,
            forward_authorization=self.forward_authorization,
            gpus=tuple(self.gpus) if self.gpus is not None else None,
            max_running=self.max_running,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
        )

    @model_validator(mode="after")
    def _carbon(self) -> BackendEntry:
        if self.carbon_zone is not None and not self.carbon_zone.strip():
            raise ValueError(f"backend {self.name}: carbon_zone must not be empty")
        if self.carbon_zone is not None and self.carbon_intensity is not None:
            raise ValueError(f"backend {self.name}: give carbon_zone or carbon_intensity, not both")
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v != AUTO and v not in KIND_NAMES:
            raise ValueError(f"backend kind must be {AUTO!r} or one of {', '.join(KIND_NAMES)}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not all((c.isascii() and c.isalnum()) or c in "-_." for c in v):
            raise ValueError(
                f"backend name must be ASCII letters, digits, '-', '_' or '.', got {v!r}"
            )
        return v


def parse_backend_specs(specs: list[Any]) -> list[BackendEntry]:
    """`URL`, `NAME=URL`, or a dict from the config file -> named backends."""
    out: list[BackendEntry] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, BackendEntry):
            out.append(spec)
        elif isinstance(spec, dict):
            out.append(BackendEntry.model_validate(spec))
        elif isinstance(spec, str):
            name, sep, url = spec.partition("=")
            if not sep:
                name, url = ("default" if i == 0 else f"backend-{i + 1}"), spec
            out.append(BackendEntry(name=name.strip(), url=url.strip()))
        else:
            raise ValueError(f"cannot read backend {spec!r}")
    names = [b.name for b in out]
    if len(set(names)) != len(names):
        raise ValueError(f"backend names must be unique, got {names}")
    return out


class Settings(BaseModel):
    """Everything `energy-proxy serve` can be told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    backends: list[BackendEntry] = Field(default_factory=list)
    power_source: str = "auto"
    sample_hz: float = Field(default=20.0, gt=0.0, le=1000.0)
    # "auto" learns the idle draw per source (a low percentile of power while nothing is
    # in flight); a number fixes it in watts for every source.
    idle_watts: float | Literal["auto"] = "auto"
    carbon_intensity: float = Field(
        default=DEFAULT_CARBON_INTENSITY_G_PER_KWH, ge=0.0, allow_inf_nan=False
    )
    # Electricity Maps: a zone (e.g. "DE"), or a latitude and longitude, plus the API key
    # from ELECTRICITYMAPS_API_KEY. Without them the static figure above is used.
    carbon_zone: str | None = None
    carbon_lat: float | None = Field(default=None, ge=-90.0, le=90.0)
    carbon_lon: float | None = Field(default=None, ge=-180.0, le=180.0)
    electricitymaps_url: str = "https://api.electricitymaps.com"
    # The API's `latest` figure is updated hourly.
    carbon_refresh_s: float = Field(default=3600.0, gt=0.0)
    electricitymaps_api_key: str | None = Field(default=None, repr=False)
    # A SQLite file, or a postgresql:// URL (one store for a fleet; may hold a password).
    db: str = Field(default_factory=lambda: default_db_path(), repr=False)
    # 0 keeps records forever
    retention_days: int = Field(default=30, ge=0)
    # The store's size limit in MB; None: 1024, or half the space the disk has if less.
    db_max_mb: float | None = Field(default=None, ge=1.0)
    # Records answered but not yet written that the store holds while its database is
    # away (a PostgreSQL restart); beyond this they are dropped and counted.
    db_queue_records: int = Field(default=100_000, ge=1)
    # Each record handed to the operating system before its energy is told, replayed at
    # the next start: "auto" (beside the database), "off", or a path prefix.
    journal: str = "auto"
    # Every key's energy/carbon budget unless its [[keys]] table sets its own:
    # "joules=N,co2eq_g=N,per=hour|day|month[,soft]" (proxy/budgets.py); None: none.
    budget: Budget | None = None
    # How often each budgeted key's use is read from the store (a fleet's other proxies'
    # requests are seen that late).
    budget_refresh_s: float = Field(default=5.0, gt=0.0)
    # OpenTelemetry: spans and metrics to this OTLP/HTTP endpoint (or where the OTEL_*
    # variables say); None and no variables: off.
    otlp_endpoint: str | None = None
    # The default window of /v1/energy/summary and the labels: a duration (24h, 7d) or "all".
    summary_window: str = DEFAULT_WINDOW
    attribution: Literal["model", "queue", "tokens", "equal"] = "model"
    # Which backend serving a model takes a request (backends/choice.py): first,
    # least-loaded, energy or carbon; `routes` sets it per model (config file).
    route: str = "first"
    routes: dict[str, str] = Field(default_factory=dict)
    # The share of requests `energy` and `carbon` send elsewhere to keep every figure fresh.
    route_explore: float = Field(default=DEFAULT_EXPLORE, ge=0.0, le=0.5)
    # Requests that may wait at a backend while another has room (the routing guard).
    route_max_waiting: int = Field(default=DEFAULT_MAX_WAITING, ge=0)
    # /metrics also carries the backend's own series, unchanged (one backend: a sidecar
    # whose router reads one metrics path per endpoint).
    pass_backend_metrics: bool = False
    pue: float = Field(default=1.0, ge=1.0)
    # Embodied emissions of the host and its lifespan, for SCI's M (metering/carbon/sci.py).
    # None: the default for the hardware measured (318 kg per GPU; none without a GPU).
    embodied_kgco2eq: float | None = Field(default=None, ge=0.0)
    lifespan_years: float = Field(default=DEFAULT_LIFESPAN_YEARS, gt=0.0)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    backend_timeout: float = Field(default=600.0, gt=0.0)
    categories: list[str] = Field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    api_keys: list[str] = Field(default_factory=list, repr=False)
    # Tenants' keys as NAME:SHA256[:admin] (--key-hash, ENERGY_PROXY_KEY_HASH) or
    # [[keys]] tables (name, sha256, admin) in the config file; proxy/auth.py.
    keys: list[ApiKey] = Field(default_factory=list, repr=False)
    # /metrics: open (for Prometheus) unless protected by an admin key, or served on a
    # listen address of its own (HOST:PORT) instead of the main one.
    protect_metrics: bool = False
    metrics_listen: str | None = None
    # Seconds a client may take to send its request body, or leave an answer unread.
    client_timeout: float = Field(default=60.0, gt=0.0)
    # Seconds a connection may take to send a request's line and headers (proxy/http_guard.py).
    header_timeout: float = Field(default=30.0, gt=0.0)
    upstream_client: Literal["aiohttp", "httpx"] = "aiohttp"
    models_refresh_s: float = Field(default=30.0, gt=0.0)
    # How often the backends' own /metrics are read (their in-flight counts, the cross-check)
    backend_metrics_s: float = Field(default=5.0, gt=0.0)
    # ... and how often while requests may be waiting at a backend (more in flight than
    # it runs at once, or two or more while that is not known): the queue shows then.
    backend_metrics_fast_s: float = Field(default=0.25, gt=0.0)
    log_level: str = "info"
    # One JSON line per finished request on standard error (README "Operations").
    request_log: bool = True
    # Paths of the backend's API passed through unmetered beyond the defaults
    # (proxy/relay/passthrough.py), e.g. "/invocations"; "!PATTERN" refuses one.
    passthrough: list[str] = Field(default_factory=list)

    @field_validator("route")
    @classmethod
    def _route(cls, v: str) -> str:
        return _policy(v, "--route")

    @field_validator("routes", mode="before")
    @classmethod
    def _routes(cls, v: Any) -> Any:
        if isinstance(v, str):  # MODEL=POLICY,... from the environment
            pairs = [p.partition("=") for p in v.replace(",", " ").split() if p]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError("routes take MODEL=POLICY pairs")
            v = {m.strip(): p.strip() for m, _, p in pairs}
        if isinstance(v, dict):
            return {str(m): _policy(str(p), f"routes: {m}") for m, p in v.items()}
        return v

    @field_validator("summary_window")
    @classmethod
    def _summary_window(cls, v: str) -> str:
        v = v.strip().lower()
        if v != "all":
            parse_duration_s(v)  # raises with the reason
        return v

    @field_validator("backends", mode="before")
    @classmethod
    def _backends(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in v.replace(",", " ").split() if p]
        if isinstance(v, list):
            return parse_backend_specs(v)
        return v

    @field_validator("keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in v.replace(",", " ").split() if p]
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, ApiKey):
                out.append(item)
            elif isinstance(item, str):
                out.append(parse_key_spec(item))
            elif isinstance(item, dict):
                unknown = set(item) - {"name", "sha256", "admin", "budget"}
                if unknown:
                    raise ValueError(
                        f"a [[keys]] table takes name, sha256, admin, budget; not {sorted(unknown)}"
                    )
                budget = parse_budget(item["budget"]) if "budget" in item else None
                name, digest = str(item.get("name", "")), str(item.get("sha256", ""))
                admin = bool(item.get("admin", False))
                out.append(make_key(name, digest, admin=admin, budget=budget))
            else:
                raise ValueError("keys are NAME:SHA256[:admin] or [[keys]] tables")
        return out

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return None if v is None or v == "" else parse_budget(v)

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("--metrics-listen takes HOST:PORT")
        return v

    @field_validator("passthrough", mode="before")
    @classmethod
    def _passthrough(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in v.replace(",", " ").split() if p]
        return check_patterns(v) if isinstance(v, list) else v

    @field_validator("categories", "api_keys", mode="before")
    @classmethod
    def _csv_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("idle_watts", mode="before")
    @classmethod
    def _idle(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                raise ValueError(f"--idle-watts takes 'auto' or watts, got {v!r}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if isinstance(self.idle_watts, float) and self.idle_watts < 0:
            raise ValueError("--idle-watts must be >= 0")
        if self.carbon_zone is not None and not self.carbon_zone.strip():
            raise ValueError("--carbon-zone must not be empty")
        if (self.carbon_lat is None) != (self.carbon_lon is None):
            raise ValueError("--carbon-lat and --carbon-lon go together")
        if self.carbon_zone is not None and self.carbon_lat is not None:
            raise ValueError("give --carbon-zone or --carbon-lat/--carbon-lon, not both")
        if self.live_carbon and not self.electricitymaps_api_key:
            raise ValueError(
                "live carbon intensity (--carbon-zone or --carbon-lat/--carbon-lon) needs an "
                "Electricity Maps API key in ELECTRICITYMAPS_API_KEY"
            )
        if "other" not in self.categories:
            raise ValueError("the category set must include 'other' (the fallback)")
        if self.protect_metrics and not (self.api_keys or any(k.admin for k in self.keys)):
            raise ValueError(
                "--protect-metrics needs an admin key (--api-key or NAME:SHA256:admin)"
            )
        KeyRing.from_settings(self.api_keys, self.keys)  # names and hashes unique
        self._check_routing()
        return self

    def _check_routing(self) -> None:
        measured = sorted({self.route, *self.routes.values()} & MEASURED)
        if measured and len(self.backends) > 1:
            problem = shared_gpus(self.backends)
            if problem:
                raise ValueError(
                    f"routing by {' and '.join(measured)} needs each backend's energy measured "
                    f"apart: give every backend its own GPUs (gpus = [..], disjoint); {problem}"
                )
        if any(b.carbon_zone for b in self.backends) and not self.electricitymaps_api_key:
            raise ValueError(
                "a backend's carbon_zone needs an Electricity Maps API key in "
                "ELECTRICITYMAPS_API_KEY"
            )
        if self.pass_backend_metrics and len(self.backends) > 1:
            raise ValueError(
                "--pass-backend-metrics takes one backend (a sidecar): with several, their "
                "series would mix on one path"
            )

    @property
    def live_carbon(self) -> bool:
        """True when a place is configured for Electricity Maps."""
        return self.carbon_zone is not None or self.carbon_lat is not None

    @property
    def idle_watts_fixed(self) -> float | None:
        return None if self.idle_watts == "auto" else float(self.idle_watts)


def _policy(v: str, where: str) -> str:
    v = v.strip().lower()
    if v not in POLICIES:
        raise ValueError(f"{where}: a routing policy is one of {', '.join(POLICIES)}, got {v!r}")
    return v


def shared_gpus(backends: list[BackendEntry]) -> str:
    """Why the backends' energy is not measured apart ("" when it is): a backend without
    its own `gpus`, or two that list the same GPU."""
    owner: dict[int, str] = {}
    for b in backends:
        if not b.gpus:
            return f"backend {b.name} names no gpus"
        for g in b.gpus:
            if g in owner:
                return f"backends {owner[g]} and {b.name} share GPU {g}"
            owner[g] = b.name
    return ""


FIELDS = tuple(Settings.model_fields)
# Flags whose name differs from the field (`--backend` is repeatable and fills `backends`).
FLAG_ALIASES = {"backend": "backends", "api_key": "api_keys", "key_hash": "keys"}


def _normalise_keys(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = FLAG_ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown setting {k!r}")
        out[key] = v
    return out


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """`ENERGY_PROXY_<FLAG>` variables (plus ELECTRICITYMAPS_API_KEY elsewhere)."""
    out: dict[str, Any] = {}
    names = set(FIELDS) | set(FLAG_ALIASES)
    for name in names:
        val = env.get("ENERGY_PROXY_" + name.upper())
        if val is not None:
            out[FLAG_ALIASES.get(name, name)] = val
    return out


def file_values(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return _normalise_keys(raw, str(p))


def load_settings(flags: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """Merge flag > env > file > default. `flags` holds only the flags the user gave."""
    given = dict(flags)
    config_path = given.pop("config", None) or env.get("ENERGY_PROXY_CONFIG")
    given = _normalise_keys(given, "flags")
    merged: dict[str, Any] = {}
    if config_path:
        merged.update(file_values(config_path))
    merged.update(env_values(env))
    merged.update(given)
    # The key comes from its own variable only (never a flag: flags show in `ps`).
    if env.get("ELECTRICITYMAPS_API_KEY"):
        merged["electricitymaps_api_key"] = env["ELECTRICITYMAPS_API_KEY"]
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """One line per problem, naming the flag but never echoing a value (keys are values)."""
    flags = {field: flag for flag, field in FLAG_ALIASES.items()}
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            lines.append(msg)
            continue
        # The flag the user wrote (--backend, not the field's --backends.url); a config
        # file's or the environment's name for it is the same word.
        field = str(err["loc"][0])
        flag = f"--{flags.get(field, field).replace('_', '-')}"
        # A key inside it (a [[backends]] table's max_running), unless the message names it.
        inner = [str(p) for p in err["loc"][1:] if not isinstance(p, int)]
        if inner and inner[-1] not in msg and inner[-1].replace("_", " ") not in msg:
            flag += f": {inner[-1].replace('_', '-')}"
        lines.append(f"{flag}: {msg}")
    return "invalid settings: " + "; ".join(lines)
