"""The node's configuration: a YAML file validated by pydantic models.

Every section forbids unknown keys, so a misspelt key is an error instead of a silently ignored
setting. :func:`load_config` finds the file (argument, then ``$OPMRI_CONFIG``, then the embedded
default), validates it and resolves relative paths against the folder of the file they came
from. Problems are reported as :class:`ConfigError`, whose message names the file, the key path
(``node.ae_title``, ``peers.pacs.port``) and the reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.config import PipelineSettings

ENV_VAR: Final[str] = "OPMRI_CONFIG"
"""Environment variable naming the config file when no path is given."""

EMBEDDED_SOURCE: Final[str] = "<embedded default>"

DEFAULT_CONFIG_YAML: Final[str] = """\
# Embedded default: a node that answers to OPMRI on port 11112, keeps its data in ./var and
# accepts no peers until some are configured.
node:
  ae_title: OPMRI
  bind: 0.0.0.0
  port: 11112
  data_dir: var
  study_stable_seconds: 10
peers: {}
queue:
  broker: null
pipeline:
  device: auto
  models_dir: models
"""

_AE_CHARSET = re.compile(r"^[\x20-\x5b\x5d-\x7e]+$")  # printable ASCII except backslash
_PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def validate_ae_title(value: str) -> str:
    """Validate a DICOM AE title (VR AE) and return it without insignificant spaces.

    PS3.5 section 6.2: at most 16 characters of the default repertoire without backslash or
    control characters; leading and trailing spaces are not significant and a value of only
    spaces is not allowed.

    Raises:
        ValueError: with the reason, for an empty, too long or badly formed title.
    """
    if not isinstance(value, str):
        raise ValueError("an AE title must be a string")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("an AE title must not be empty or only spaces")
    if len(stripped) > 16:
        raise ValueError(f"an AE title has at most 16 characters, this one has {len(stripped)}")
    if not _AE_CHARSET.fullmatch(stripped):
        raise ValueError(
            "an AE title may only contain printable ASCII characters other than backslash"
        )
    return stripped


def _validate_host(value: str) -> str:
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


AETitle = Annotated[str, AfterValidator(validate_ae_title)]
Host = Annotated[str, AfterValidator(_validate_host)]
Port = Annotated[int, Field(ge=0, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Timeouts(_Section):
    """Timeouts in seconds for associations the node accepts or requests."""

    acse: PositiveSeconds = 30.0
    """Waiting for A-ASSOCIATE and A-RELEASE messages (also the ARTIM timer)."""
    dimse: PositiveSeconds = 60.0
    """Waiting for a DIMSE message (a response, or the next request)."""
    network: PositiveSeconds = 60.0
    """An association with no traffic for this long is aborted; a PDU must arrive within it."""
    connect: PositiveSeconds = 10.0
    """Opening a TCP connection to a peer."""


class NodeSection(_Section):
    """The ``node:`` section: the node's own AE and where it keeps its data."""

    ae_title: AETitle = "OPMRI"
    """The AE title the node answers to (the called AE title peers must use)."""
    bind: Host = "0.0.0.0"
    """Address to listen on (``0.0.0.0`` all IPv4 interfaces, ``::`` all IPv6 ones)."""
    port: Port = 11112
    """TCP port for the DICOM listener; 0 lets the operating system choose one."""
    data_dir: Path = Path("var")
    """Spool, state database, audit log, results; relative to the config file's folder."""
    study_stable_seconds: Annotated[float, Field(gt=0, le=86400)] = 10.0
    """A study is complete once it received no new instance for this many seconds."""
    max_associations: Annotated[int, Field(ge=1, le=256)] = 8
    """Simultaneous associations; more are rejected (transient, local limit exceeded)."""
    max_pdu_length: Annotated[int, Field(ge=4096, le=64 * 1024 * 1024)] = 1024 * 1024
    """Largest PDU peers may send (advertised in negotiation); a PDU longer than this and
    than 1 MiB aborts the association before it is read."""
    receive_processes: Annotated[int, Field(ge=1, le=64)] = 1
    """Processes that serve associations. 1: the node's own process. More: the node listens
    and hands each connection to the least busy of these processes, so concurrent
    associations use several CPU cores (set it to the number of cores of a busy node)."""
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 1024
    """Free space to keep on the data volume; below it C-STORE answers 0xA700."""
    timeouts: Timeouts = Field(default_factory=Timeouts)


class PeerConfig(_Section):
    """A remote AE the node talks to."""

    ae_title: AETitle
    host: Host
    port: Annotated[int, Field(ge=1, le=65535)]
    may_send: bool = False
    """The peer may send studies to the node (C-STORE); other peers may only verify."""
    results: bool = False
    """Analysis results are sent to this peer."""
    check_host: bool = False
    """Accept associations with this AE title only from ``host``'s addresses."""


class QueueSection(_Section):
    """The ``queue:`` section: where analysis jobs run."""

    broker: str | None = None
    """``null``: jobs run inside the node; ``redis://host:port/db``: Celery workers."""
    visibility_timeout: Annotated[float, Field(ge=10, le=7 * 86400)] = 3600.0
    """Seconds a delivered, unacknowledged task stays invisible before Redis hands it to
    another worker (a worker that vanished as a whole); keep it above the longest task."""
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    """Deliveries of one analysis job (a worker lost mid-job counts) before it is failed."""
    requeue_interval: Annotated[float, Field(ge=1, le=86400)] = 60.0
    """The node sends pending jobs and due exports to the broker again after this long
    (messages lost with a broker that restarted without its data)."""

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"rediss?://\S+", value):
            raise ValueError("broker must be null or a redis:// or rediss:// URL")
        return value


class RetryPolicy(_Section):
    """Exponential back-off for sending results to peers."""

    initial_delay_s: Annotated[float, Field(gt=0)] = 30.0
    factor: Annotated[float, Field(ge=1)] = 2.0
    max_delay_s: Annotated[float, Field(gt=0)] = 600.0
    max_attempts: Annotated[int, Field(ge=1)] = 10

    @model_validator(mode="after")
    def _check_order(self) -> RetryPolicy:
        if self.max_delay_s < self.initial_delay_s:
            raise ValueError("max_delay_s must not be smaller than initial_delay_s")
        return self


class ExportSection(_Section):
    """The ``export:`` section: how results are sent to the peers marked ``results: true``."""

    retry: RetryPolicy = Field(default_factory=RetryPolicy)


class MonitoringSection(_Section):
    """The ``monitoring:`` section: HTTP endpoints for Prometheus and health checks."""

    bind: Host = "127.0.0.1"
    """Address of the HTTP listener (``0.0.0.0`` to let a scraper on another host in)."""
    port: Port | None = None
    """Port serving ``/metrics`` (Prometheus) and ``/healthz``; ``null``: no HTTP listener."""
    worker_port: Port | None = None
    """Port of the same endpoints in ``opmri-node worker`` (``null``: none)."""


class NodeConfig(_Section):
    """The whole configuration file."""

    node: NodeSection = Field(default_factory=NodeSection)
    peers: dict[str, PeerConfig] = Field(default_factory=dict)
    queue: QueueSection = Field(default_factory=QueueSection)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    export: ExportSection = Field(default_factory=ExportSection)
    monitoring: MonitoringSection = Field(default_factory=MonitoringSection)

    @field_validator("peers", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("peers")
    @classmethod
    def _check_peer_names(cls, value: dict[str, PeerConfig]) -> dict[str, PeerConfig]:
        for name in value:
            if not _PEER_NAME.fullmatch(name):
                raise ValueError(
                    f"peer name {name!r} must start with a letter or digit and contain only "
                    "letters, digits, '_', '.' and '-' (at most 64 characters)"
                )
        return value

    def peer(self, name: str) -> PeerConfig:
        """Return the peer called ``name``.

        Raises:
            KeyError: with a message listing the configured peers.
        """
        try:
            return self.peers[name]
        except KeyError:
            known = ", ".join(sorted(self.peers)) or "none configured"
            raise KeyError(f"no peer named {name!r} in the config (peers: {known})") from None

    def to_yaml(self) -> str:
        """The effective configuration as YAML (paths absolute, defaults filled in)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file."""

    source: str
    key: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        key = self.key or "(top level)"
        return f"{where}: {key}: {self.reason}"


class ConfigError(Exception):
    """The configuration could not be read or is invalid.

    ``str(error)`` has one line per problem: ``FILE[:LINE]: KEY.PATH: reason``.
    """

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))

    @classmethod
    def single(cls, source: str, key: str, reason: str, line: int | None = None) -> ConfigError:
        return cls([ConfigIssue(source, key, reason, line)])


def load_config(path: Path | str | None = None) -> NodeConfig:
    """Load and validate the node's configuration.

    Args:
        path: the YAML file. When ``None``, the file named by ``$OPMRI_CONFIG``; when that is
            unset or empty, the embedded default (AE ``OPMRI`` on port 11112, ``data_dir: var``
            relative to the current directory, no peers).

    Returns:
        The validated configuration, with relative paths made absolute against the config
        file's folder (the current directory for the embedded default).

    Raises:
        ConfigError: naming the file, the key path and the reason for each problem.
    """
    source, text, base = _locate(path)
    return parse_config(text, source=source, base_dir=base)


def config_source(path: Path | str | None = None) -> str:
    """Describe where :func:`load_config` would read the configuration from."""
    return _locate_name(path)[0]


def parse_config(text: str, *, source: str, base_dir: Path) -> NodeConfig:
    """Validate YAML text as a node configuration (see :func:`load_config`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError.single(source, "", f"not valid YAML: {problem}", line) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError.single(
            source, "", f"the file must hold a mapping of sections, not {type(data).__name__}"
        )
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        lines = _KeyLines(text)
        issues = []
        for error in exc.errors(include_url=False):
            loc = tuple(str(part) for part in error["loc"])
            reason = _reason(error)
            issues.append(ConfigIssue(source, ".".join(loc), reason, lines.find(loc)))
        raise ConfigError(issues) from None
    _resolve_paths(config, base_dir)
    return config


def _reason(error: Any) -> str:
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown key (not part of this section)"
    if error["type"] == "missing":
        return "required key is missing"
    return message


def _locate_name(path: Path | str | None) -> tuple[str, Path | None]:
    if path is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            return env, Path(env)
        return EMBEDDED_SOURCE, None
    return str(path), Path(path)


def _locate(path: Path | str | None) -> tuple[str, str, Path]:
    source, file = _locate_name(path)
    if file is None:
        return source, DEFAULT_CONFIG_YAML, Path.cwd()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError.single(source, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError.single(source, "", "is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single(source, "", f"cannot be read: {exc}") from None
    return source, text, file.resolve().parent


def _resolve_paths(model: BaseModel, base: Path) -> None:
    """Make every relative :class:`Path` field (in nested sections too) absolute against base."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            if not value.is_absolute():
                object.__setattr__(model, name, (base / value.expanduser()).resolve())
        elif isinstance(value, BaseModel):
            _resolve_paths(value, base)
        elif isinstance(value, dict):
            for item in value.values():
                if isinstance(item, BaseModel):
                    _resolve_paths(item, base)


class _KeyLines:
    """Line numbers of keys in a YAML document, to point error messages at the right line."""

    def __init__(self, text: str) -> None:
        try:
            self._root: yaml.Node | None = yaml.compose(text)
        except yaml.YAMLError:
            self._root = None

    def find(self, loc: tuple[str, ...]) -> int | None:
        node = self._root
        line: int | None = None
        for part in loc:
            if not isinstance(node, yaml.MappingNode):
                break
            for key_node, value_node in self._pairs(node):
                if str(key_node.value) == part:
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                break
        return line

    @staticmethod
    def _pairs(node: yaml.MappingNode) -> Iterator[tuple[yaml.Node, yaml.Node]]:
        yield from node.value
