"""Service configuration: one frozen pydantic-settings model per service, from CLI flags and FLEETSERVE_* env vars."""

from __future__ import annotations

import socket
import sys
from typing import TypeVar

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

S = TypeVar("S", bound="ServiceSettings")

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def advertised_address(bind_host: str, advertise_host: str, port: int) -> str:
    """The host:port other machines reach a server bound on bind_host:port at: advertise_host when given, else
    the bind host, or this machine's hostname when bound to every interface (0.0.0.0 is no address to dial)."""
    host = advertise_host or (socket.gethostname() if bind_host in WILDCARD_HOSTS else bind_host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


def service_config(service: str) -> SettingsConfigDict:
    """The settings config every service uses: env prefix FLEETSERVE_<SERVICE>_, kebab-case flags, frozen."""
    return SettingsConfigDict(
        env_prefix=f"FLEETSERVE_{service.upper()}_",
        frozen=True,
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name=f"python -m services.{service}",
    )


class ServiceSettings(BaseSettings):
    """Settings every service has."""

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(0, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    ready_file: str = Field(
        "",
        description="Once serving, write {address, pid} as JSON to this file (how launchers learn port 0).",
    )
    otlp_endpoint: str = Field(
        "", description="host:port of an OTLP/gRPC collector (the metrics service) for spans and metrics."
    )
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$", description="Lowest log level.")
    log_json: bool = Field(
        default_factory=lambda: not sys.stderr.isatty(),
        description="JSON logs (--no-log-json for console); default: JSON unless stderr is a TTY.",
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight streams may take to finish."
    )
    metrics_export_interval_s: float = Field(
        5.0, gt=0, description="How often OTLP metrics are pushed to the collector."
    )
    metrics_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="Port of the Prometheus /metrics endpoint on --host; 0 picks a free one (in the ready "
        "file as metrics_address), -1 turns it off.",
    )
    tls_cert: str = Field(
        "",
        description="PEM certificate (chain) of this service: with --tls-key its gRPC port (and the gateway's "
        "HTTP port) speaks TLS, and it is the client certificate this service presents to the others.",
    )
    tls_key: str = Field("", description="PEM private key of --tls-cert (a file only its user may read).")
    tls_ca: str = Field(
        "",
        description="PEM CA bundle: the certificates of the services this one calls must chain to it, and its "
        "own internal port accepts only clients presenting a certificate it signed (mTLS; the gateway's public "
        "ports ask none). Needs --tls-cert.",
    )
    tls_server_name: str = Field(
        "",
        description="Name to verify in the certificates of the services this one calls, instead of the "
        "address's host (replicas registered by IP: a name every fleet certificate carries).",
    )

    @model_validator(mode="after")
    def _tls_complete(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("tls_ca (mTLS) needs tls_cert and tls_key: a fleet service is server and client")
        return self


def secret_flags(cls: type[BaseSettings]) -> dict[str, str]:
    """{--flag: ENV_VAR} of the fields marked secret (json_schema_extra={"secret": True}): those are read from
    the environment only, since a command line is visible to every user of the machine (ps, /proc)."""
    prefix = cls.model_config.get("env_prefix", "")
    return {
        "--" + name.replace("_", "-"): f"{prefix}{name}".upper()
        for name, f in cls.model_fields.items()
        if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("secret")
    }


class WorkerSettings(ServiceSettings):
    """Settings of a service that can run as several worker processes (shared/workers.py)."""

    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Worker processes sharing this service's ports (SO_REUSEPORT), each on a core of its own; "
        "a supervisor process restarts any that dies.",
    )
    worker_index: int = Field(
        -1, ge=-1, description="Set by the supervisor: this worker's index (-1: not a worker)."
    )
    worker_count: int = Field(1, ge=1, description="Set by the supervisor: how many workers there are.")
    worker_port: int = Field(
        0, ge=0, le=65535, description="Set by the supervisor: this worker's private port (0: a free one)."
    )
    max_requests_per_worker: int = Field(
        0,
        ge=0,
        description="With --workers: a worker drains and is replaced after this many requests (0: never), "
        "bounding what one process can accumulate (grpc.aio leaks natively on some cancelled streams).",
    )
    max_requests_jitter: int = Field(
        0, ge=0, description="Up to this many more requests per worker (random), so workers restart apart."
    )
    recycle_file: str = Field(
        "", description="Set by the supervisor: the file a worker touches when it is due for recycling."
    )
    stop_file: str = Field(
        "",
        description="Set by the supervisor: a file that exists once the whole service stops (every worker "
        "drains); a worker that drains while it does not (recycled, or stopped alone) hands its clients to its "
        "siblings.",
    )


def load_settings(cls: type[S], argv: list[str] | None = None) -> S:
    """Parse flags (argv, default sys.argv[1:]) over env vars over defaults; exit 2 with a clear message on bad values."""
    args = sys.argv[1:] if argv is None else argv
    for flag, env in secret_flags(cls).items():
        if any(a == flag or a.startswith(flag + "=") for a in args):
            print(
                f"invalid configuration for {cls.__name__}: {flag} is a secret and cannot be a flag "
                f"(every user of this machine can read a command line); set {env} instead",
                file=sys.stderr,
            )
            raise SystemExit(2)
    try:
        return CliApp.run(cls, cli_args=args)
    except ValidationError as e:
        print(f"invalid configuration for {cls.__name__}:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None


class RegistryWatchSettings(BaseModel):
    """How a service follows a long-lived registry watch (shared.watching.follow): a mixin of its settings, put
    before ServiceSettings among the bases (BaseSettings parses them; the flags come after the common ones)."""

    watch_backoff_base_s: float = Field(
        0.1, gt=0, description="First reconnect delay (full jitter, doubling) when a registry watch breaks."
    )
    watch_backoff_max_s: float = Field(5.0, gt=0, description="Longest reconnect delay for a registry watch.")
    watch_resubscribe_s: float = Field(
        600.0,
        gt=0,
        description="Timeout of one registry watch; the service then resubscribes (fresh snapshot).",
    )
