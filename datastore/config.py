"""Settings: one frozen dataclass, every field documented.

Three sources fill it, in this order of precedence: command-line flags,
environment variables (``DATASTORE_<FIELD>``, e.g. ``DATASTORE_PORT=9000``),
and a TOML file (``--config FILE``, keys named like the fields, either in the
top level or under a ``[datastore]`` table). Anything not given keeps the
embedded default, so ``datastore serve`` alone runs a store in ``./data`` on
127.0.0.1:8006.

Byte sizes accept a plain integer or a number with a K, M, G or T suffix
(powers of 1024); durations are seconds.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol.manifest import ManifestLimits
from .security.policy import Audience, Policy, PolicyError
from .security.tls import normalise_subject

_PUBLIC_URL = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?(/[A-Za-z0-9._~%/-]*)?$")
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOOK_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s#]*)?$")
#: What a prefix name matches (the route patterns and the OpenAPI document use it too).
PREFIX_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_PREFIX = re.compile(f"^{PREFIX_PATTERN}$")
_SIZE = re.compile(r"^\s*([0-9]+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: Who may read the metrics page: the values of ``metrics_access``.
METRICS_ACCESS = ("admins", "loopback", "anyone")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything an operator can set. Defaults are the embedded ones."""

    root: Path = field(default=Path("data"), metadata={"doc": "Directory holding one folder per prefix."})
    state_dir: Path | None = field(
        default=None,
        metadata={"doc": "Transfer state, catalogues and staging; default ROOT/.datastore (never servable)."},
    )
    state_url: str | None = field(
        default=None,
        metadata={
            "doc": "Where transfers, leases, events, jobs and catalogues are kept: sqlite:///PATH, or "
            "postgresql://USER@HOST/DB (shared by several nodes); default the SQLite file transfers.sqlite3 in "
            "the state directory."
        },
    )
    host: str = field(default="127.0.0.1", metadata={"doc": "Address to listen on."})
    port: int = field(default=8006, metadata={"doc": "TCP port to listen on (0 picks a free one)."})
    public_url: str | None = field(
        default=None,
        metadata={
            "doc": "The store's URL as clients reach it (https://files.example.org), for the URLs it returns; "
            "default: the address and port each request arrived on (never the Host header)."
        },
    )
    prefixes: tuple[str, ...] = field(
        default=("files",), metadata={"doc": "Prefixes served by a DirectoryHandler on ROOT/NAME."}
    )
    overwrite: bool = field(default=False, metadata={"doc": "Whether an upload may replace a file of the same name."})
    max_manifest_bytes: int = field(default=8 << 20, metadata={"doc": "Largest manifest body accepted (413 beyond)."})
    max_files: int = field(default=10_000, metadata={"doc": "Most files one manifest may list (413 beyond)."})
    max_manifest_memory: int = field(
        default=64 << 20,
        metadata={
            "doc": "Bytes of manifests being read or waiting to be parsed at once, per worker (503 beyond; at "
            "least max_manifest_bytes)."
        },
    )
    max_file_size: int = field(default=64 << 30, metadata={"doc": "Largest single file accepted (413 beyond)."})
    key_lifetime: float = field(
        default=24 * 3600.0, metadata={"doc": "Seconds a transfer key stays valid (410 afterwards)."}
    )
    transfer_retention: float = field(
        default=7 * 24 * 3600.0,
        metadata={"doc": "Seconds the records of finished, cancelled and expired transfers are kept."},
    )
    sweep_interval: float = field(
        default=60.0, metadata={"doc": "Seconds between sweeps that expire keys and forget old records."}
    )
    event_retention: float = field(
        default=24 * 3600.0,
        metadata={"doc": "Seconds events are kept for clients that catch up (Last-Event-ID) and for webhooks."},
    )
    lease_time: float = field(
        default=30.0,
        metadata={
            "doc": "Seconds an upload's hold on its file lasts unless renewed (it is, while the upload runs): a "
            "process that dies frees its files after this long."
        },
    )
    hook_urls: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "URLs every event is POSTed to as JSON, at least once, retried with backoff (--hook-url)."},
    )
    hook_backlog: int = field(
        default=100_000,
        metadata={"doc": "Events a webhook may fall behind by; beyond, its oldest are skipped (and logged)."},
    )
    hook_timeout: float = field(
        default=10.0, metadata={"doc": "Seconds a webhook receiver has to answer one delivery."}
    )
    body_timeout: float = field(
        default=60.0,
        metadata={"doc": "Seconds an upload may go without receiving a byte before it is dropped (408)."},
    )
    idle_timeout: float = field(
        default=75.0,
        metadata={
            "doc": "Seconds a connection may wait without a request under way (before its first, between two, "
            "or while its headers trickle in) before it is closed."
        },
    )
    max_concurrent_uploads: int = field(
        default=64, metadata={"doc": "Uploads running at once (per worker); more are answered 503 with Retry-After."}
    )
    max_uploads_per_client: int = field(
        default=8,
        metadata={"doc": "Uploads one identity (or, anonymous, one address) runs at once, per worker (429 beyond)."},
    )
    max_reserved_bytes_per_client: int = field(
        default=256 << 30,
        metadata={"doc": "Bytes one identity's open transfers may still write, all together (429 beyond)."},
    )
    max_reserved_names_per_client: int = field(
        default=20_000,
        metadata={"doc": "Files one identity's open transfers may reserve, all together (429 beyond)."},
    )
    max_transfers_per_client: int = field(
        default=200, metadata={"doc": "Open transfers one identity may hold at once (429 beyond)."}
    )
    start_timeout: float = field(
        default=900.0,
        metadata={"doc": "Seconds a transfer may wait for its first byte before it expires and its names are free."},
    )
    min_upload_rate: int = field(
        default=1024,
        metadata={
            "doc": "Bytes per second an upload (or a manifest) must average over each rate_window (408 below); "
            "0 turns the check off."
        },
    )
    rate_window: float = field(default=30.0, metadata={"doc": "Seconds over which min_upload_rate is measured."})
    max_connections: int = field(
        default=0,
        metadata={
            "doc": "Connections open at once, per worker (more get 503 and are closed); 0: from the file-descriptor "
            "limit, at most 4096."
        },
    )
    max_connections_per_client: int = field(
        default=256, metadata={"doc": "Connections one address may hold open at once, per worker (503 beyond)."}
    )
    node_id: str | None = field(
        default=None,
        metadata={
            "doc": "This node's name among the nodes sharing a state store (in leases, logs and the health "
            "answer): letters, digits and .-_ (up to 64); default the host's name."
        },
    )
    workers: int = field(
        default=1,
        metadata={"doc": "datastore serve: processes serving the same port(s) (SO_REUSEPORT) and state; 1 to 64."},
    )
    min_free_bytes: int = field(
        default=64 << 20, metadata={"doc": "Free space kept on the store's disk beyond every upload."}
    )
    chunk_size: int = field(default=1 << 20, metadata={"doc": "Bytes hashed and written per step of an upload."})
    upload_buffer_budget: int = field(
        default=16 << 20,
        metadata={"doc": "Upload bytes held in memory at once by all uploads of a worker (at least two chunks)."},
    )
    fsync: bool = field(default=True, metadata={"doc": "fsync each file and its directory before answering 200."})
    digest_threads: int = field(
        default=1,
        metadata={
            "doc": "Threads per worker computing, after publishing, the digests an upload's client did not"
            " declare (at the lowest CPU priority)."
        },
    )
    tls: bool = field(
        default=False,
        metadata={"doc": "Speak TLS on PORT, requiring client certificates (needs tls_cert, tls_key, tls_client_ca)."},
    )
    tls_port: int | None = field(
        default=None, metadata={"doc": "Add a TLS listener on this port beside plain HTTP on PORT."}
    )
    tls_cert: Path | None = field(default=None, metadata={"doc": "The server's certificate chain (PEM)."})
    tls_key: Path | None = field(default=None, metadata={"doc": "The server's private key (PEM)."})
    tls_client_ca: tuple[Path, ...] = field(
        default=(), metadata={"doc": "CA certificates that sign accepted client certificates (PEM, one or more)."}
    )
    tls_crl: Path | None = field(
        default=None, metadata={"doc": "Certificate revocation list (PEM); reloaded on change and on SIGHUP."}
    )
    crl_check_interval: float = field(
        default=30.0, metadata={"doc": "Seconds between checks of the CRL file for changes."}
    )
    tls_handshake_timeout: float = field(
        default=10.0,
        metadata={"doc": "Seconds a client may take over its TLS handshake (its connection counts meanwhile)."},
    )
    trust_client_dn: bool = field(
        default=False,
        metadata={
            "doc": "Take X-Client-DN headers on plain HTTP as identities (AccessGrid 2.x clients on a trusted "
            "network only: anyone can write any DN); otherwise the header is ignored."
        },
    )
    policy: Policy = field(
        default=Policy(),
        metadata={
            "doc": "Access policy of every prefix: list, read, upload = anyone|users|admins, delete = owner|admins, "
            "show_owners, tls_only ([policy] in TOML, [policy.PREFIX] per prefix; --allow read=anyone)."
        },
    )
    prefix_policies: tuple[tuple[str, Policy], ...] = field(
        default=(), metadata={"doc": "Per-prefix policies ([policy.PREFIX] tables in TOML)."}
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "Addresses or networks (CIDR) of load balancers in front of the store: a request from one "
            "counts as from the address it saw (the last X-Forwarded-For entry) for per-client limits and "
            "loopback-only access; from anyone else the header is ignored."
        },
    )
    admin_subjects: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "Client-certificate subjects (RFC 4514, e.g. CN=ada,O=Lab) that are administrators."},
    )
    admin_issuer: str | None = field(
        default=None,
        metadata={
            "doc": "The issuer (RFC 4514) of the administrators' certificates; default: the one client CA "
            "(required with several)."
        },
    )
    metrics_access: str = field(
        default="admins",
        metadata={
            "doc": "Who may read the metrics (GET /_api/v1/metrics): admins (administrators and tokens issued "
            "for metrics), loopback (also anyone connecting from the loopback address), or anyone."
        },
    )
    job_concurrency: int = field(
        default=8, metadata={"doc": "Files transfer jobs copy at once, all jobs and processes together."}
    )
    job_concurrency_per_job: int = field(default=4, metadata={"doc": "Files one transfer job copies at once."})
    job_concurrency_per_client: int = field(
        default=4,
        metadata={"doc": "Files one identity's transfer jobs copy at once, all together (no one takes every slot)."},
    )
    job_concurrency_per_host: int = field(
        default=4, metadata={"doc": "Files transfer jobs copy at once to one destination host."}
    )
    job_stall_timeout: float = field(
        default=60.0,
        metadata={
            "doc": "Seconds a job's copy may go without a byte moving (or a call to either end without an "
            "answer) before it is reported stalled and started again from its offset."
        },
    )
    job_max_idle_attempts: int = field(
        default=5, metadata={"doc": "Attempts in a row without a byte of progress after which a job's file fails."}
    )
    job_retention: float = field(
        default=7 * 86400.0, metadata={"doc": "Seconds a finished transfer job's record is kept (then purged)."}
    )
    max_jobs_per_client: int = field(
        default=1000, metadata={"doc": "Unfinished transfer jobs one identity may keep (429 beyond)."}
    )
    max_job_files: int = field(default=10_000, metadata={"doc": "Files one transfer job may copy (413 beyond)."})
    job_hosts: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "Hosts (HOST or HOST:PORT) transfer jobs may reach over http(s), as sources or "
            "destinations; * for any. Empty: jobs copy only within this store and to rclone remotes."
        },
    )
    job_rclone_config: Path | None = field(
        default=None,
        metadata={"doc": "rclone configuration whose named remotes jobs may use (rclone:NAME:path); none: no rclone."},
    )
    invitation_max_wait: float = field(
        default=7 * 86400.0,
        metadata={"doc": "Seconds an invitation to this store waits for an answer at most (then it expires)."},
    )
    max_invitations_per_client: int = field(
        default=20, metadata={"doc": "Invitations one client may have waiting for an answer here (429 beyond)."}
    )
    job_tls_cert: Path | None = field(
        default=None, metadata={"doc": "Client certificate (PEM) jobs present to https stores that ask for one."}
    )
    job_tls_key: Path | None = field(default=None, metadata={"doc": "Its private key (PEM)."})
    job_tls_ca: tuple[Path, ...] = field(
        default=(), metadata={"doc": "CA certificates jobs trust for https peers (default: the system's)."}
    )

    @property
    def uses_tls(self) -> bool:
        """Whether any listener speaks TLS."""
        return self.tls or self.tls_port is not None

    @property
    def effective_state_dir(self) -> Path:
        """The state directory, defaulting to ``ROOT/.datastore``."""
        return self.state_dir if self.state_dir is not None else self.root / ".datastore"

    @property
    def effective_node_id(self) -> str:
        """This node's name: the setting, or the host's name (as a node id may spell it)."""
        if self.node_id is not None:
            return self.node_id
        return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "node"

    @property
    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The networks of :attr:`trusted_proxies`."""
        return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in self.trusted_proxies)

    @property
    def state_kind(self) -> str:
        """The state store's kind (``sqlite`` or ``postgresql``), as the health answer names it."""
        scheme = self.effective_state_url.split(":", 1)[0]
        return "postgresql" if scheme == "postgres" else scheme

    @property
    def effective_state_url(self) -> str:
        """The state store's URL, defaulting to the SQLite file in the state directory."""
        if self.state_url is not None:
            return self.state_url
        return f"sqlite:///{(self.effective_state_dir / 'transfers.sqlite3').absolute()}"

    def policy_for(self, prefix: str) -> Policy:
        """The access policy of ``prefix``: its own, or the one of every prefix."""
        return dict(self.prefix_policies).get(prefix, self.policy)

    @property
    def manifest_limits(self) -> ManifestLimits:
        """The limits handed to the manifest parser."""
        return ManifestLimits(max_files=self.max_files, max_file_size=self.max_file_size)

    def __post_init__(self) -> None:
        for prefix in self.prefixes:
            check_prefix(prefix)
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be between 0 and 65535, not {self.port}")
        positive = (
            "max_manifest_bytes",
            "max_files",
            "max_manifest_memory",
            "max_concurrent_uploads",
            "chunk_size",
            "upload_buffer_budget",
            "digest_threads",
            "max_uploads_per_client",
            "max_reserved_bytes_per_client",
            "max_reserved_names_per_client",
            "max_transfers_per_client",
            "max_connections_per_client",
            "hook_backlog",
            "job_concurrency",
            "job_concurrency_per_job",
            "job_concurrency_per_client",
            "job_concurrency_per_host",
            "job_max_idle_attempts",
            "max_jobs_per_client",
            "max_job_files",
            "max_invitations_per_client",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.max_manifest_memory < self.max_manifest_bytes:
            raise SettingsError("max_manifest_memory must be at least max_manifest_bytes")
        if self.max_connections < 0 or self.min_upload_rate < 0:
            raise SettingsError("max_connections and min_upload_rate must not be negative")
        for name in (
            "key_lifetime",
            "body_timeout",
            "sweep_interval",
            "idle_timeout",
            "start_timeout",
            "rate_window",
            "tls_handshake_timeout",
            "event_retention",
            "lease_time",
            "hook_timeout",
            "job_stall_timeout",
            "job_retention",
            "invitation_max_wait",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.max_file_size < 0 or self.min_free_bytes < 0:
            raise SettingsError("sizes must not be negative")
        if self.transfer_retention < 0:
            raise SettingsError("transfer_retention must not be negative")
        if not 1 <= self.workers <= 64:
            raise SettingsError(f"workers must be between 1 and 64, not {self.workers}")
        if self.crl_check_interval <= 0:
            raise SettingsError("crl_check_interval must be positive")
        if self.tls and self.tls_port is not None:
            raise SettingsError("use tls (TLS on port) or tls_port (TLS beside plain HTTP), not both")
        if self.tls_port is not None and not 0 <= self.tls_port <= 65535:
            raise SettingsError(f"tls_port must be between 0 and 65535, not {self.tls_port}")
        for name in (*self.admin_subjects, *([self.admin_issuer] if self.admin_issuer is not None else [])):
            try:
                normalise_subject(name)
            except ValueError:
                raise SettingsError(
                    f"{name!r} is no RFC 4514 name (write CN=ada,O=Lab, the most specific first)"
                ) from None
        for url in self.hook_urls:
            if not _HOOK_URL.match(url):
                raise SettingsError(f"hook_urls: {url!r} is no http(s) URL")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(
                    f"trusted_proxies: {proxy!r} is no address or network (10.0.0.5, 10.0.0.0/24)"
                ) from None
        if self.node_id is not None and not _NODE_ID.fullmatch(self.node_id):
            raise SettingsError(f"node_id must be 1 to 64 letters, digits, '.', '-' or '_', not {self.node_id!r}")
        if self.state_url is not None and not self.state_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise SettingsError(f"state_url must be sqlite:///PATH or postgresql://..., not {self.state_url!r}")
        if self.metrics_access not in METRICS_ACCESS:
            raise SettingsError(
                f"metrics_access must be one of {', '.join(METRICS_ACCESS)}, not {self.metrics_access!r}"
            )
        if self.public_url is not None and not _PUBLIC_URL.match(self.public_url):
            raise SettingsError(f"public_url must be http(s)://HOST[:PORT][/PATH], not {self.public_url!r}")
        for prefix, _ in self.prefix_policies:
            check_prefix(prefix)
        if (self.job_tls_cert is None) != (self.job_tls_key is None):
            raise SettingsError("job_tls_cert and job_tls_key go together")
        if self.uses_tls and (self.tls_cert is None or self.tls_key is None or not self.tls_client_ca):
            raise SettingsError("TLS needs a certificate, its key and a client CA (--cert, --key, --client-ca)")


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid prefix name, else raise SettingsError."""
    if not _PREFIX.match(prefix):
        raise SettingsError(
            f"invalid prefix {prefix!r}: use 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return prefix


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build Settings from flags, then ``DATASTORE_*`` variables, then a TOML file.

    ``flags`` holds values already typed (from argparse), with ``None`` for
    flags not given. Raises :class:`SettingsError` naming the bad setting.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_from_toml(config_file))
    # Policy rules from the environment and flags apply on top of the file's [policy] table.
    rules: list[str] = []
    for name, text in (environ or {}).items():
        if name.startswith("DATASTORE_"):
            key = name.removeprefix("DATASTORE_").lower()
            if key == "policy":
                rules.append(text)
            elif key in _FIELDS and key != "prefix_policies":
                values[key] = _convert(key, text)
    for key, value in (flags or {}).items():
        if value is None or key not in _FIELDS:
            continue
        if key == "policy":
            rules.extend(value if isinstance(value, (list, tuple)) else [value])
        else:
            values[key] = value
    try:
        for text in rules:
            values["policy"] = parse_rules(text, values.get("policy"))
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None
    try:
        return Settings(**values)
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None
    except TypeError as exc:  # pragma: no cover - guarded by _FIELDS
        raise SettingsError(str(exc)) from None


def settings_help() -> str:
    """A table of every setting and its default, for ``--help`` and the README."""
    rows = []
    for item in dataclasses.fields(Settings):
        default = str(item.default) if isinstance(item.default, Policy) else repr(item.default)
        rows.append(f"  {item.name:<24} {item.metadata['doc']} (default: {default})")
    return "\n".join(rows)


_FIELDS: dict[str, str] = {item.name: str(item.type) for item in dataclasses.fields(Settings)}


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    table = document.get("datastore", document)
    if not isinstance(table, dict):
        raise SettingsError(f"config file {path}: [datastore] must be a table")
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in _FIELDS or key == "prefix_policies":
            raise SettingsError(f"config file {path}: unknown setting {raw_key!r}")
        if key == "policy":
            values.update(_policies(path, value))
        else:
            values[key] = _convert(key, value)
    return values


def _policies(path: Path, table: Any) -> dict[str, Any]:
    """``[policy]`` (every prefix) and its ``[policy.PREFIX]`` sub-tables."""
    if not isinstance(table, dict):
        raise SettingsError(f"config file {path}: [policy] must be a table")
    try:
        default = policy_from({k: v for k, v in table.items() if not isinstance(v, dict)})
        per_prefix = tuple(
            (prefix, policy_from(rules, default, where=f"policy.{prefix}"))
            for prefix, rules in table.items()
            if isinstance(rules, dict)
        )
    except PolicyError as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    return {"policy": default, "prefix_policies": per_prefix}


def policy_from(values: Mapping[str, Any], base: Policy | None = None, *, where: str = "policy") -> Policy:
    """``base`` (default: the safe default) with ``values`` applied; PolicyError naming a bad key or value."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in _POLICY_KEYS:
            raise PolicyError(f"{where}: unknown key {key!r} (use {', '.join(_POLICY_KEYS)})")
        try:
            changes[name] = _boolean(value) if name in ("show_owners", "tls_only") else Audience(str(value).lower())
        except ValueError:
            expected = "true or false" if name in ("show_owners", "tls_only") else "one of anyone, users, owner, admins"
            raise PolicyError(f"{where}.{key}: {value!r} is not {expected}") from None
    try:
        return dataclasses.replace(base if base is not None else Policy(), **changes)
    except PolicyError as exc:
        raise PolicyError(f"{where}: {exc}") from None


def parse_rules(text: str, base: Policy | None = None) -> Policy:
    """``"read=anyone,list=anyone"`` (flags and environment variables) applied to ``base``."""
    values: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PolicyError(f"policy rule {part.strip()!r}: write ACTION=AUDIENCE, e.g. read=anyone")
        values[key.strip()] = value.strip()
    return policy_from(values, base)


_POLICY_KEYS = [item.name for item in dataclasses.fields(Policy)]


def _boolean(value: Any) -> bool:
    """``True``, ``"yes"``, ``"on"``, ``1`` … -> True; ValueError for what is neither."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _convert(key: str, value: Any) -> Any:
    kind = _FIELDS[key]
    try:
        if kind == "bool":
            return _boolean(value)
        if kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return parse_size(str(value))
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
        if kind == "str | None":
            return None if value in (None, "") else str(value)
        if kind == "int | None":
            return None if value in (None, "") else int(value)
        if kind in ("Path", "Path | None"):
            return Path(str(value))
        if kind in ("tuple[str, ...]", "tuple[Path, ...]"):
            items = value if isinstance(value, list) else str(value).split(",")
            texts = [str(item).strip() for item in items if str(item).strip()]
            return tuple(Path(text) for text in texts) if kind == "tuple[Path, ...]" else tuple(texts)
    except ValueError:
        raise SettingsError(f"setting {key}: cannot use {value!r}") from None
    raise SettingsError(f"setting {key}: unsupported type {kind}")  # pragma: no cover


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdwy]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> float:
    """``"30d"`` -> 2592000.0 (s, m, h, d, w, y); plain numbers are seconds. ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 3600, 90m, 12h or 30d")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864; plain integers pass through."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * _UNITS[match.group(2).upper()]
