"""Typed daemon configuration: a TOML file plus environment overrides, validated up front.

Every setting has a default except the watched folders. Errors name the file and
the setting (``watch.roots[0].path``) and say what is wrong, so a service that
will not start tells its operator why.

Environment overrides use ``CELLSEG1D_<SECTION>__<KEY>`` (double underscore
between levels), e.g. ``CELLSEG1D_CATALOG__URL=postgresql+psycopg://...`` or
``CELLSEG1D_READINESS__SETTLE_SECONDS=5``; values are parsed as TOML scalars
when they can be (numbers, booleans), else taken as strings.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cellseg1d.errors import ConfigError

ENV_PREFIX = "CELLSEG1D_"
DEFAULT_STATE_DIR = Path("/var/lib/cellseg1d")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_PLACEHOLDER = re.compile(r"{([^{}]*)}")


class ExperimentRule(_Section):
    """Maps images to an experiment: by glob or regular expression on the path, or by a metadata key.

    Exactly one of ``glob``, ``regex`` and ``metadata`` is given. Paths are
    matched relative to the watched folder, with ``/`` separators (e.g.
    ``hela/2026-01-05/plate1.zarr/A/1/0``). ``experiment`` may use the named
    groups of ``regex`` (``{stain}``) or, for ``metadata`` rules, ``{value}``.
    """

    #: Shell-style pattern on the path under the root (``*`` stays within one folder, ``**`` spans folders).
    glob: str | None = None
    #: Regular expression searched in the path under the root; named groups fill ``experiment``.
    regex: str | None = None
    #: Dotted key in the image group's attributes (or a group above it), e.g. ``"acquisition.experiment"``.
    metadata: str | None = None
    #: The experiment name, a template: ``"{stain}-{scope}"`` (regex) or ``"{value}"`` (metadata).
    experiment: str = "{value}"

    @model_validator(mode="after")
    def _check(self) -> ExperimentRule:
        given = [k for k in ("glob", "regex", "metadata") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of glob, regex or metadata")
        names = set(_PLACEHOLDER.findall(self.experiment))
        if self.regex is not None:
            try:
                groups = set(re.compile(self.regex).groupindex)
            except re.error as err:
                raise ValueError(f"regex {self.regex!r} is not a valid regular expression: {err}") from None
            allowed, what = groups, f"named groups of the regex ({sorted(groups) or 'none'})"
        elif self.metadata is not None:
            allowed, what = {"value"}, "{value} (the metadata value)"
        else:
            allowed, what = set(), "no placeholders for a glob rule"
        unknown = sorted(names - allowed)
        if unknown:
            raise ValueError(f"experiment {self.experiment!r} uses {unknown}; allowed: {what}")
        if not self.experiment.strip():
            raise ValueError("experiment must not be empty")
        return self


class WatchRoot(_Section):
    """One acquisition folder to watch (recursively)."""

    path: Path
    #: "in_place": labels go inside each image (``<image>/labels/<name>``).
    #: "mirror": the acquisition folder is treated as read-only and labels go to
    #: ``<mirror_root>/<image path under the root>/labels/<name>``.
    output: Literal["in_place", "mirror"] = "in_place"
    mirror_root: Path | None = None
    #: Rules naming each image's experiment; the first that matches wins. Plugins
    #: (``resolve_experiment`` hook) are asked first; no answer: experiment "default".
    experiments: list[ExperimentRule] = Field(default_factory=list)
    #: With SAM configured, what an image whose experiment has no adapter assigned gets:
    #: "default": the default adapter (the one assigned to experiment "default", else
    #: ``sam.adapter``, else the base model); "classical": the classical segmenter;
    #: "hold": its job waits (state "held") until an adapter is assigned.
    without_adapter: Literal["default", "classical", "hold"] = "default"

    @field_validator("path", "mirror_root")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Absolute and free of symlinks, so event paths, catalog paths and
        # output paths all agree whatever the daemon's working directory is.
        return None if value is None else value.expanduser().resolve()

    @model_validator(mode="after")
    def _check_mirror(self) -> WatchRoot:
        if self.output == "mirror" and self.mirror_root is None:
            raise ValueError("output = 'mirror' needs mirror_root = '<folder for the labels>'")
        if self.mirror_root is not None:
            root, mirror = self.path, self.mirror_root
            if mirror == root or root in mirror.parents:
                raise ValueError(
                    f"mirror_root {self.mirror_root} lies inside the watched folder {self.path}; "
                    "choose a folder outside it"
                )
        return self


class WatchSettings(_Section):
    roots: list[WatchRoot] = Field(default_factory=list)
    #: Use stat polling instead of file events (network shares: SMB/NFS send no events).
    polling: bool = False
    #: Source of file events: "auto" (inotify on Linux, watchdog elsewhere), "inotify" or "watchdog".
    backend: Literal["auto", "inotify", "watchdog"] = "auto"
    poll_interval_seconds: float = Field(5.0, gt=0)
    #: Full rescan of every root: catches images that arrived while the daemon was
    #: down and anything the event stream missed.
    rescan_seconds: float = Field(60.0, gt=0)
    #: Folder-name endings that mark an OME-Zarr container (case-insensitive).
    container_suffixes: list[str] = Field(default_factory=lambda: [".zarr"])


class ReadinessSettings(_Section):
    #: An image is ready only when nothing in its folder changed for this long.
    settle_seconds: float = Field(10.0, ge=0)
    #: Wait for a completion marker (attribute or sentinel file) before processing.
    require_marker: bool = False
    #: Group attributes that mark an acquisition as finished when present and truthy
    #: (on the image group or any group above it in the container).
    marker_attributes: list[str] = Field(
        default_factory=lambda: ["acquisition_complete", "finalized_at"]
    )
    #: File names whose presence in the image folder or container marks it finished.
    sentinel_files: list[str] = Field(default_factory=lambda: ["acquisition_complete", ".complete"])
    #: Accept arrays with chunks missing from storage (zarr skips chunks that equal
    #: the fill value; some writers pad mosaics that way). Off: a missing chunk
    #: after the settle time means a truncated image and fails it.
    allow_missing_chunks: bool = False
    #: A quiet image whose arrays still miss chunks is treated as still being
    #: acquired (e.g. a time-lapse between time points) for this long; after
    #: that it is recorded as failed (truncated). It is processed whenever the
    #: missing chunks arrive, even later.
    incomplete_after_seconds: float = Field(3600.0, ge=0)


class SegmentationSettings(_Section):
    #: Channels to segment, by name (omero label) or 0-based index; several are
    #: passed to the segmenter together. Empty: channel 0.
    channels: list[str | int] = Field(default_factory=list)
    #: Name of the label image written under ``labels/``.
    labels_name: str = "cellseg1d"
    #: false: a new run (e.g. ``cellseg1d reprocess`` with a new adapter version) replaces
    #: the label image atomically. true: runs with a registered adapter write
    #: ``<labels_name>-<adapter>-v<version>``, so every version's labels stay side by side.
    versioned_labels: bool = False

    @field_validator("labels_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        from cellseg1d.types import check_output_name

        return check_output_name(value)


class ClassicalSettings(_Section):
    """Parameters of the built-in classical segmenter (used when no SAM model is set)."""

    sigma: float = Field(1.5, ge=0)
    min_distance: int = Field(5, ge=1)
    min_size: int = Field(20, ge=0)
    threshold: Literal["otsu", "li"] = "otsu"


#: The names of cellseg1d.model.sam.SPECS (kept here so that reading a config does not import torch).
SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")


#: Names of the inference profiles (``sam.profile``); what each sets is in :mod:`cellseg1d.model.profiles`.
SAM_PROFILES = ("paper", "fast", "quick")


class SamSettings(_Section):
    """The built-in SAM + LoRA segmenter (CellSeg1). Off until ``checkpoint`` is set."""

    #: An official SAM checkpoint file (``sam_vit_h_4b8939.pth`` ...); its sha256 is checked.
    #: Empty: SAM is off and the classical segmenter runs. Get one with ``cellseg1d models fetch``.
    checkpoint: Path | None = None
    #: Optional check: the backbone (vit_b, vit_l, vit_h) is read from the checkpoint's shapes; when this
    #: is set and the checkpoint is another backbone, the daemon refuses to start. Empty: no check.
    model_type: str | None = None
    #: Load a checkpoint whose sha256 is not the official one of its backbone (fine-tuned bases).
    allow_custom_checkpoint: bool = False
    #: A LoRA adapter folder (``adapter.safetensors`` + ``adapter.json``) made by ``cellseg1d train``,
    #: used when an image's experiment has no adapter assigned and none is assigned to "default".
    adapter: Path | None = None
    #: How many adapters stay loaded on the base model (LRU); switching to a cached one is cheap.
    adapter_cache_size: int = Field(8, ge=1, le=256)
    device: str = "auto"
    image_size: int = Field(512, ge=64)
    points_per_side: int = Field(32, ge=1)
    points_per_batch: int = Field(64, ge=1)
    #: 0 embeds the whole plane only: about 5x less encoder time, lower AP on small cells (docs/engine.md).
    crop_n_layers: int = Field(1, ge=0, le=2)
    #: Approximation: skip grid points inside masks already found (measured AP cost in docs/engine.md).
    skip_covered_points: bool = False
    pred_iou_thresh: float = Field(0.8, ge=0, le=1)
    stability_score_thresh: float = Field(0.6, ge=0, le=1)
    #: Image to 8 bits before SAM: "minmax" (the CellSeg1 reference: min..max to 0..255, truncated) or
    #: "percentile" (0.5th..99.5th percentile, clipped and rounded; robust to a few hot pixels).
    normalize: Literal["minmax", "percentile"] = "minmax"
    #: The NMS after the hole/island clean-up: "reference" (the reference's rule) or "cleaned" (docs/engine.md).
    cleanup_nms: Literal["reference", "cleaned"] = "reference"
    #: Painting overlapping masks: "reference" (a mask clears its whole area, paints its largest piece)
    #: or "largest_piece" (only the largest piece overwrites; no holes left in larger cells).
    paint: Literal["reference", "largest_piece"] = "reference"
    #: Planes larger than this (pixels per side) are segmented in overlapping tiles.
    tile: int = Field(1024, ge=128)
    tile_overlap: int = Field(256, ge=0)
    #: Named inference profile: "paper" (the CellSeg1 paper's settings, labels equal to the reference's),
    #: "fast" (bfloat16 where the hardware has it) or "quick" (also a 16 x 16 grid, no crops). Settings
    #: written in this section win over the profile's. Measured time and AP of each: docs/engine.md.
    profile: str = "paper"

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in SAM_PROFILES:
            raise ValueError(f"{value!r} is not a SAM profile (sam.profile: one of {', '.join(SAM_PROFILES)})")
        return value

    @field_validator("checkpoint", "adapter")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @field_validator("model_type")
    @classmethod
    def _known_model_type(cls, value: str | None) -> str | None:
        if value is not None and value not in SAM_MODEL_TYPES:
            raise ValueError(f"{value!r} is not a SAM model type (known: {', '.join(SAM_MODEL_TYPES)}); leave "
                             "it out: the backbone is read from the checkpoint")
        return value


class AdapterSettings(_Section):
    """The adapter store (``cellseg1d adapters add``)."""

    #: Folder holding registered adapters as ``<name>/v<version>/``; empty: ``<state_dir>/adapters``.
    store: Path | None = None

    @field_validator("store")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()


class CatalogSettings(_Section):
    #: SQLAlchemy URL; empty: a SQLite file ``catalog.sqlite`` in the state dir. For a shared
    #: catalog: ``postgresql+psycopg://USER@HOST[:PORT]/DB`` (the password does not belong here).
    url: str | None = None
    #: File holding the database password (first line; not readable by other users). Or set the
    #: environment variable ``CELLSEG1D_CATALOG_PASSWORD`` (not both).
    password_file: Path | None = None

    @field_validator("password_file")
    @classmethod
    def _absolute_password_file(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().absolute()


class JobSettings(_Section):
    workers: int = Field(1, ge=1, le=64)
    max_attempts: int = Field(3, ge=1)
    lease_seconds: float = Field(300.0, gt=5)
    retry_backoff_seconds: float = Field(30.0, ge=0)


class PluginSettings(_Section):
    #: Installed entry-point plugins (group ``cellseg1d``) to load, by name. Only
    #: listed ones are imported: installing a package never runs its code.
    enable: list[str] = Field(default_factory=list)
    #: Built-in plugins to switch off, e.g. ``["classical"]``.
    disable: list[str] = Field(default_factory=list)
    #: An ``export`` call that has not returned after this long fails the image's job, naming the plugin.
    timeout_seconds: float = Field(300.0, gt=0)


class PathMap(_Section):
    """One shared-storage prefix as the daemon sees it and as the Dask workers see it."""

    #: The prefix on this machine, e.g. ``"/mnt/scope1"``.
    daemon: Path
    #: The same folder on the workers, e.g. ``"/data/scopes/scope1"``.
    worker: Path

    @field_validator("daemon", "worker")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"{value} is not an absolute path")
        return value


class ExecutorSettings(_Section):
    """Where planes are segmented: in this process ("local") or on a Dask cluster ("dask")."""

    #: "local": the daemon's worker threads segment; "dask": planes are sent to the cluster at ``scheduler``.
    kind: Literal["local", "dask"] = "local"
    #: The Dask scheduler, e.g. ``"tcp://gpu-server:8786"`` (kind = "dask").
    scheduler: str | None = None
    #: How long to wait for the scheduler at start (and for each reconnection attempt).
    connect_timeout_seconds: float = Field(10.0, gt=0)
    #: Planes larger than this (pixels per side) are split into overlapping blocks, segmented
    #: on their own (on different workers with "dask") and stitched into one label image.
    block_size: int = Field(4096, ge=64)
    #: Blocks overlap by at least this many pixels: at least twice the largest cell diameter.
    block_overlap: int = Field(256, ge=0)
    #: At most this many plane or block tasks of one job are in flight at once (bounds memory).
    max_tasks_in_flight: int = Field(32, ge=1)
    #: Paths as the workers see them: each image, adapter and checkpoint path under ``daemon``
    #: is sent as the same path under ``worker``. Empty: the same paths everywhere.
    path_map: list[PathMap] = Field(default_factory=list)

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if "://" not in value:
            raise ValueError(f"{value!r} is not a scheduler address; write it as 'tcp://HOST:PORT'")
        return value

    @model_validator(mode="after")
    def _check(self) -> ExecutorSettings:
        if self.kind == "dask" and self.scheduler is None:
            raise ValueError("kind = 'dask' needs scheduler = 'tcp://HOST:PORT' (the address 'dask scheduler' prints)")
        if self.block_overlap * 2 >= self.block_size:
            raise ValueError(f"block_overlap ({self.block_overlap}) must be less than half of block_size "
                             f"({self.block_size})")
        return self

    def to_worker(self, path: Path) -> Path:
        """``path`` as the workers see it (the longest matching ``path_map`` prefix replaced)."""
        best: PathMap | None = None
        for item in self.path_map:
            if path == item.daemon or item.daemon in path.parents:
                if best is None or len(item.daemon.parts) > len(best.daemon.parts):
                    best = item
        return path if best is None else best.worker / path.relative_to(best.daemon)


class _ServedSection(_Section):
    """A section with an optional ``address`` to serve HTTP on (off when empty)."""

    #: ``HOST:PORT`` to serve on; a bare ``PORT`` or ``":PORT"`` binds loopback only. Empty: off.
    address: str | None = None

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_address(value)
        return value.strip()

    @property
    def host_port(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind, or None when it is off."""
        return None if self.address is None else parse_address(self.address)


class MetricsSettings(_ServedSection):
    """The Prometheus ``/metrics`` and ``/healthz`` HTTP endpoint (off by default).

    ``address`` e.g. ``"127.0.0.1:9108"``; ``0.0.0.0:9108`` exposes it to the network.
    """

    #: ``/healthz`` answers 503 when the scheduler loop has not ticked for this long.
    stale_after_seconds: float = Field(30.0, gt=0)


#: Environment variable holding the dashboard's access token (instead of ``dashboard.token``).
DASHBOARD_TOKEN_ENV = "CELLSEG1D_DASHBOARD_TOKEN"
#: Shortest accepted dashboard token.
DASHBOARD_TOKEN_MIN = 16


class DashboardSettings(_ServedSection):
    """The read-only web dashboard (off by default; ``cellseg1d dashboard`` serves it on its own).

    ``address`` beyond loopback (``0.0.0.0:8080``) requires a token.
    """

    #: Access token (at least 16 characters), or set ``CELLSEG1D_DASHBOARD_TOKEN``; required beyond loopback.
    #: Browsers give it once as ``?token=...`` (kept in a cookie); scripts send ``Authorization: Bearer ...``.
    token: str | None = None

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if len(value) < DASHBOARD_TOKEN_MIN:
            raise ValueError(f"the token must have at least {DASHBOARD_TOKEN_MIN} characters (e.g. the output "
                             "of 'openssl rand -hex 16')")
        return value


def parse_address(value: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[::1]:PORT"``, ``":PORT"`` or ``"PORT"`` -> ``(host, port)``; loopback by default."""
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. '127.0.0.1:9108' or '9108')")
    return host, int(port)


class Config(_Section):
    """The whole daemon configuration."""

    state_dir: Path = DEFAULT_STATE_DIR
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: "text": human-readable lines; "json": one JSON object per line (for log shippers).
    log_format: Literal["text", "json"] = "text"
    #: On SIGTERM, images in progress get this long to finish; unfinished jobs are then
    #: released for the next start (keep the unit's TimeoutStopSec above it).
    shutdown_timeout_seconds: float = Field(120.0, ge=0)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    readiness: ReadinessSettings = Field(default_factory=ReadinessSettings)
    segmentation: SegmentationSettings = Field(default_factory=SegmentationSettings)
    classical: ClassicalSettings = Field(default_factory=ClassicalSettings)
    sam: SamSettings = Field(default_factory=SamSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    plugins: PluginSettings = Field(default_factory=PluginSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    #: Settings for third-party plugins, one table per plugin name; passed as-is.
    plugin_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def catalog_url(self) -> str:
        """The catalog URL, defaulting to a SQLite file in the state directory."""
        return self.catalog.url or f"sqlite:///{self.state_dir / 'catalog.sqlite'}"

    @property
    def adapter_store(self) -> Path:
        """The adapter store folder, defaulting to ``adapters`` in the state directory."""
        return self.adapters.store or self.state_dir / "adapters"

    def check_runnable(self) -> None:
        """Checks that only matter when the daemon starts (not for ``status``)."""
        if not self.watch.roots:
            raise ConfigError(
                "no folder to watch: add a [[watch.roots]] table with path = '...' "
                "to the config file, or pass --watch DIR"
            )
        for i, root in enumerate(self.watch.roots):
            if not root.path.is_dir():
                raise ConfigError(
                    f"setting watch.roots[{i}].path: {root.path} is not an existing folder; "
                    "create it or correct the path"
                )


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        loc = ""
        for part in item["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown setting (check its spelling and section)"
        lines.append(f"  setting {loc or '<top>'}: {msg}")
    return "\n".join(lines)


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge ``CELLSEG1D_SECTION__KEY=value`` variables into a config dict."""
    environ = dict(os.environ if environ is None else environ)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (ENV_PREFIX + "CONFIG", ENV_PREFIX + "CATALOG_PASSWORD",
                                                       DASHBOARD_TOKEN_ENV):
            continue  # not settings: the config file's path and secrets (read where they are used)
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"environment variable {name}: '{key}' is not a section")
        target[keys[-1]] = _parse_env_value(raw)
    return data


def build_config(data: dict[str, Any], source: str = "command line") -> Config:
    """Validate a config dict, raising :class:`ConfigError` that names each bad setting."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Read a TOML config file (optional), apply environment and explicit overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except PermissionError:
            raise ConfigError(f"config file {path} is not readable by this user") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    apply_env_overrides(data, environ)
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, last = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value
    return build_config(data, source)


def default_state_dir() -> Path:
    """Where a quick-start daemon (no config file) keeps its catalog."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cellseg1d"
