"""TLS and service identity: credentials for servers and channels from --tls-cert/--tls-key/--tls-ca, and the
client-side TLS of tools (CLI, load tests) from the state file or FLEETSERVE_TLS_* variables."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

# Tools (the CLI, load generators) find the fleet's client TLS here when no state file says it.
ENV_CERT, ENV_KEY, ENV_CA, ENV_SERVER_NAME = (
    "FLEETSERVE_TLS_CERT",
    "FLEETSERVE_TLS_KEY",
    "FLEETSERVE_TLS_CA",
    "FLEETSERVE_TLS_SERVER_NAME",
)


class TlsConfigError(ValueError):
    """TLS files that are missing, unreadable or incomplete (a cert without its key)."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsConfigError(f"cannot read the TLS {what} {path}: {e.strerror}") from None


@dataclass(frozen=True)
class Tls:
    """The TLS files of one process. cert + key: its ports speak TLS and, as a client of other fleet services,
    it presents that certificate. ca: peers' certificates must chain to it, and servers that serve only the
    fleet (every port but the gateway's public ones) refuse a client without a certificate it signed (mTLS).
    server_name: the name checked in servers' certificates instead of the address's host (engines registered
    by pod IP in Kubernetes: every fleet certificate carries this name)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""

    @classmethod
    def create(cls, cert: str = "", key: str = "", ca: str = "", server_name: str = "") -> Tls | None:
        """The TLS of these files, checked now (readable, cert with key); None when none is given (plaintext)."""
        if not (cert or key or ca):
            return None
        if bool(cert) != bool(key):
            raise TlsConfigError("--tls-cert and --tls-key go together")
        tls = cls(cert, key, ca, server_name)
        tls.files()  # fail at start, naming the file, rather than at the first connection
        return tls

    @classmethod
    def from_settings(cls, settings) -> Tls | None:
        """A service's TLS (ServiceSettings' tls_* fields)."""
        return cls.create(settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_server_name)

    @classmethod
    def for_tools(cls, state: Mapping | None = None) -> Tls | None:
        """Client TLS of a tool: FLEETSERVE_TLS_* variables if set, else the "tls" of the fleet's state (a
        `fleetserve up --tls` fleet: its CA and the CLI's client certificate; state None: the running local
        fleet's state file, if there is one)."""
        env = os.environ
        if env.get(ENV_CA) or env.get(ENV_CERT):
            return cls.create(
                env.get(ENV_CERT, ""), env.get(ENV_KEY, ""), env.get(ENV_CA, ""), env.get(ENV_SERVER_NAME, "")
            )
        if state is None:
            from shared.cluster import read_state  # the launcher's module imports this one

            try:
                state = read_state()
            except SystemExit:  # no local fleet: plaintext
                state = {}
        tls = state.get("tls") or {}
        return cls.create(
            tls.get("cert", ""), tls.get("key", ""), tls.get("ca", ""), tls.get("server_name", "")
        )

    @property
    def mutual(self) -> bool:
        """Whether servers require a client certificate from the CA (and clients present theirs)."""
        return bool(self.ca and self.cert)

    def files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(cert chain, private key, CA bundle) as PEM bytes, read now (certificates renewed on disk are
        picked up by the next call)."""
        return (
            _read(self.cert, "certificate") if self.cert else None,
            _read(self.key, "key") if self.key else None,
            _read(self.ca, "CA bundle") if self.ca else None,
        )

    # -- gRPC ------------------------------------------------------------------------------------------

    def server_credentials(self, client_auth: bool = True) -> grpc.ServerCredentials:
        """Credentials of a gRPC server port. client_auth (internal ports): with a CA, a client must present a
        certificate it signed. A certificate renewed on disk (cert-manager, a new local CA) is served to new
        connections without a restart."""
        if not self.cert:
            raise TlsConfigError("a TLS server needs --tls-cert and --tls-key")
        cert, key, ca = self.files()
        loaded = [self._mtimes()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # gRPC asks before each handshake: a stat of three files, and a reload only when one changed.
            mtimes = self._mtimes()
            if mtimes == loaded[0]:
                return None
            try:
                c, k, a = self.files()
            except TlsConfigError:
                return None  # half-written renewal: keep serving the certificate we have
            loaded[0] = mtimes
            return grpc.ssl_server_certificate_configuration([(k, c)], root_certificates=a)

        return grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca),
            fetch,
            require_client_authentication=bool(client_auth and ca),
        )

    def _mtimes(self) -> tuple[float, ...]:
        out = []
        for p in (self.cert, self.key, self.ca):
            try:
                out.append(os.stat(p).st_mtime if p else 0.0)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a channel to a fleet service: verify it against the CA (system roots without one) and,
        with mTLS, present this process's certificate."""
        cert, key, ca = self.files()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self, target: str = "") -> tuple[tuple[str, str], ...]:
        """Channel options: the name to verify in the server's certificate, when it is not the target's host:
        server_name if set; for a target listing several addresses (ipv4:a:1,b:2, the redundant registries)
        the first one's host, where gRPC would check a name no certificate holds."""
        name = self.server_name or _first_host(target)
        return (("grpc.ssl_target_name_override", name),) if name else ()

    # -- HTTP ------------------------------------------------------------------------------------------

    def server_ssl_context(self) -> ssl.SSLContext:
        """An SSL context for an HTTP server port (the OpenAI API, the dashboard): TLS 1.2+, no client
        certificate asked for (HTTP clients authenticate with API keys)."""
        if not self.cert:
            raise TlsConfigError("a TLS server needs --tls-cert and --tls-key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise TlsConfigError(f"cannot load {self.cert} / {self.key}: {e}") from None
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context for an HTTP client of the fleet (verifies against the CA; presents the cert if any)."""
        ctx = ssl.create_default_context(cafile=self.ca or None)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def as_state(self) -> dict[str, str]:
        """The paths as the state file keeps them (what `for_tools` reads back)."""
        return {"cert": self.cert, "key": self.key, "ca": self.ca, "server_name": self.server_name}


def _first_host(target: str) -> str:
    """The host of the first address of an ipv4:/ipv6: target ("" for a plain host:port, checked as is)."""
    for prefix in ("ipv4:", "ipv6:"):
        if target.startswith(prefix):
            first = target[len(prefix) :].split(",")[0]
            host = first.rsplit(":", 1)[0] if first.count(":") == 1 or first.startswith("[") else first
            return host.strip("[]")
    return ""


def scheme(tls: Tls | None) -> str:
    """http or https: the scheme of a fleet's HTTP ports, given the TLS of one of its services or tools."""
    return "http" if tls is None else "https"
