"""Checks of the setup: the config, the watched folders, the catalog, plugins and the executor."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellseg1d.service.doctor.common import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    Context,
    _creatable,
    _merge,
    _user,
)

#: Connect timeout (seconds) for a PostgreSQL catalog while doctor checks it.
PG_CONNECT_TIMEOUT_S = 5


# -- 1. config -------------------------------------------------------------------------------------------


def check_config(load_config: Callable[[], Any], source: Path | None) -> tuple[Any, Check]:
    """(the Config or None, its row): parses the config the way the daemon would."""
    from cellseg1d.errors import ConfigError

    where = str(source) if source is not None else "no config file (defaults and command-line options)"
    try:
        config = load_config()
    except ConfigError as err:
        text = str(err)
        if source is not None and str(source) not in text:
            text = f"{source}: {text}"
        return None, Check("config", FAIL, text,
                           "correct the setting or the syntax named above (every setting, with its default, "
                           "is described in deploy/cellseg1d.toml)", {"file": str(source) if source else None})
    except OSError as err:
        return None, Check("config", FAIL, f"config file {source}: cannot be read: {err.strerror or err}",
                           "pass a readable TOML file with --config", {"file": str(source)})
    message = f"{where} parsed" if source is not None else f"{where}; state dir {config.state_dir}"
    return config, Check("config", OK, message, "", {"file": str(source) if source else None})


# -- 2. watched folders ----------------------------------------------------------------------------------


def check_roots(ctx: Context) -> list[Check]:
    """Each watched folder exists, is a readable folder, and its labels can be written."""
    roots = ctx.config.watch.roots
    if not roots:
        if ctx.config_file is not None:
            return [Check("watch.roots", FAIL, "watch.roots: no folder to watch is configured; the daemon "
                          "refuses to start",
                          "add a [[watch.roots]] table with path = '/data/acquisitions' to the config file")]
        return [Check("watch.roots", WARN, "watch.roots: no config file, so no watched folder to check "
                      "(a quick-start daemon gets them from 'cellseg1d run --watch DIR')",
                      "pass --config FILE to check the folders a service watches")]
    return [_check_root(i, root) for i, root in enumerate(roots)]


def _check_root(i: int, root: Any) -> Check:
    name = f"watch.roots[{i}]"
    key = f"watch.roots[{i}].path"
    path: Path = root.path
    details = {"path": str(path), "output": root.output,
               "mirror_root": str(root.mirror_root) if root.mirror_root else None}
    user = _user(os.geteuid())
    if not os.path.lexists(path):
        return Check(name, FAIL, f"{key}: {path} does not exist", "create the folder or correct the path",
                     details)
    if not path.is_dir():
        return Check(name, FAIL, f"{key}: {path} is not a folder", "point the setting at the acquisition folder",
                     details)
    if not os.access(path, os.R_OK | os.X_OK):
        return Check(name, FAIL, f"{key}: {path} is not readable by {user}",
                     f"give {user} read access (e.g. its group), or run the daemon as a user that has it",
                     details)
    problems: list[tuple[str, str, str]] = []
    if root.output == "in_place":
        if not os.access(path, os.W_OK | os.X_OK):
            problems.append((FAIL, (f"{key}: {path} is not writable by {user}, but labels are written inside "
                             "each image (output = \"in_place\")"),
                             f"give {user} write access, or set output = \"mirror\" with a writable mirror_root"))
        where = f"labels go inside the images (in place, {path} writable)"
    else:
        mirror: Path = root.mirror_root
        mkey = f"watch.roots[{i}].mirror_root"
        if os.path.lexists(mirror):
            if not mirror.is_dir():
                problems.append((FAIL, f"{mkey}: {mirror} is not a folder", "point mirror_root at a folder"))
            elif not os.access(mirror, os.W_OK | os.X_OK):
                problems.append((FAIL, f"{mkey}: {mirror} is not writable by {user}",
                                 f"give {user} write access to {mirror} or choose another mirror_root"))
            where = f"labels go to mirror_root {mirror} (writable)"
        else:
            why = _creatable(mirror)
            if why:
                problems.append((FAIL, f"{mkey}: {mirror} does not exist and cannot be created: {why}",
                                 "create the folder, or choose a mirror_root that can be created"))
            where = f"labels go to mirror_root {mirror} (created at the first result)"
    return _merge(name, problems, f"{path}: readable folder; {where}", details)


# -- 7. catalog ------------------------------------------------------------------------------------------


def migration_state(current: str | None) -> tuple[str, list[str]]:
    """(head revision, revisions still to apply to a database at ``current``, oldest first).

    Raises KeyError when ``current`` is not a revision this cellseg1d knows.
    """
    from alembic.script import ScriptDirectory

    from cellseg1d.catalog.db import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if current is not None:
        try:
            script.get_revision(current)
        except Exception as err:  # alembic raises several kinds for an unknown revision
            raise KeyError(current) from err
    pending = [r.revision for r in script.iterate_revisions("heads", current or "base")]
    return head, list(reversed(pending))


def check_catalog(ctx: Context) -> list[Check]:
    """The catalog answers and its schema is at this version's head (``ctx.catalog`` is set then)."""
    config = ctx.config
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from cellseg1d.catalog.db import _one_line, open_catalog, redact
    from cellseg1d.errors import CellsegError

    url = config.catalog_url
    shown = redact(url)
    details: dict[str, Any] = {"url": shown}
    try:
        parsed = make_url(url)
    except ArgumentError:
        return [Check("catalog", FAIL, f"catalog.url: {shown} is not a valid database URL",
                      "expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB", details)]
    reach_fix = ("check catalog.url (host, port, database name), that the server runs and accepts this "
                 "machine, and the password (catalog.password_file or CELLSEG1D_CATALOG_PASSWORD)")
    if parsed.get_backend_name() == "sqlite":
        reach_fix = "check the state dir and the catalog file's permissions"
        db_file = parsed.database
        if not db_file or db_file == ":memory:":
            return [Check("catalog", WARN, f"catalog.url: {shown} is an in-memory database: nothing is kept "
                          "between starts", "use a file (sqlite:///PATH) or leave catalog.url empty", details)]
        if not Path(db_file).exists():
            return [Check("catalog", WARN, f"catalog: {db_file} does not exist yet; it is created at the "
                          "first start", "", details)]
    try:
        catalog = open_catalog(config, connect_timeout=PG_CONNECT_TIMEOUT_S)
    except CellsegError as err:
        return [Check("catalog", FAIL, str(err), reach_fix, details)]
    try:
        catalog.ping()
        current = catalog.schema_revision()
        has_tables = catalog.has_schema()
    except (SQLAlchemyError, CellsegError, OSError) as err:
        catalog.close()
        return [Check("catalog", FAIL, f"catalog: cannot reach {shown}: {_one_line(err)}", reach_fix, details)]
    details["revision"] = current
    try:
        head, pending = migration_state(current)
    except KeyError:
        catalog.close()
        return [Check("catalog", FAIL, f"catalog at {shown}: schema revision {current} is unknown to this "
                      "cellseg1d (written by a newer version?)",
                      "upgrade cellseg1d to the version the other daemons run", details)]
    details.update(head=head, pending=pending)
    if current is None:
        catalog.close()
        if has_tables:
            return [Check("catalog", FAIL, f"catalog at {shown}: cellseg1d tables without a schema revision "
                          "(alembic_version is missing)", "restore the catalog from a backup", details)]
        return [Check("catalog", WARN, f"catalog at {shown}: empty database; the daemon creates the schema at "
                      "its first start", "", details)]
    if pending:
        catalog.close()
        return [Check("catalog", FAIL, f"catalog at {shown}: schema at revision {current}, {len(pending)} "
                      f"migration(s) pending ({', '.join(pending)}, head {head})",
                      "back up the catalog, then start this version's daemon: it applies the migrations at "
                      "start", details)]
    ctx.catalog = catalog
    return [Check("catalog", OK, f"{shown} reachable, schema at head ({head})", "", details)]


# -- 11. plugins -----------------------------------------------------------------------------------------


def check_plugins(ctx: Context) -> list[Check]:
    """Build the plugin manager as the daemon does and run each plugin's configure hook on its own."""
    config = ctx.config
    from cellseg1d.errors import ConfigError
    from cellseg1d.plugins import BUILTINS, build_plugin_manager, plugin_names

    try:
        pm = build_plugin_manager(config.plugins.enable, config.plugins.disable, ())
    except ConfigError as err:
        return [Check("plugins", FAIL, str(err), "install the plugin's package or remove it from the setting",
                      {"enable": list(config.plugins.enable), "disable": list(config.plugins.disable)})]
    names = plugin_names(pm)
    checks = []
    if not pm.hook.segment.get_hookimpls():
        checks.append(Check("plugins", FAIL, "plugins: no segmenter: every plugin implementing 'segment' is "
                            "disabled; the daemon refuses to start",
                            "remove 'classical' from plugins.disable or enable a model plugin", {"loaded": names}))
    else:
        checks.append(Check("plugins", OK, f"loaded: {', '.join(names)}", "", {"loaded": names}))
    for impl in pm.hook.configure.get_hookimpls():
        name = impl.plugin_name
        row = f"plugin {name}"
        if name == "sam" and config.sam.checkpoint is not None:
            checks.append(Check(row, SKIP, "configure not run: it loads the SAM checkpoint (slow, gigabytes of "
                                "memory); the checkpoint is checked in the sam.checkpoint row"))
            continue
        others = [plugin for other, plugin in pm.list_name_plugin() if other != name and plugin is not None]
        try:
            pm.subset_hook_caller("configure", remove_plugins=others)(config=config)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - a plugin must not end the check
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            off = f"add '{name}' to plugins.disable" if name in BUILTINS else f"remove '{name}' from plugins.enable"
            checks.append(Check(row, FAIL, f"plugin '{name}' refused the configuration: {type(err).__name__}: "
                                f"{text}", f"correct its settings ([plugin_settings.{name}]) or {off}",
                                {"plugin": name}))
        else:
            checks.append(Check(row, OK, "configure accepted the configuration", "", {"plugin": name}))
    return checks


def check_executor(ctx: Context) -> list[Check]:
    """With executor.kind = "dask": the scheduler answers, has workers, and each worker runs this version
    of cellseg1d and sees the watched folders and model files (at their executor.path_map paths)."""
    config = ctx.config
    settings = config.executor
    if settings.kind == "local":
        return [Check("executor", OK, "local: planes are segmented by the daemon itself")]
    from cellseg1d import __version__
    from cellseg1d.pipeline.executor.dask import worker_config
    from cellseg1d.pipeline.executor.worker import probe

    details: dict[str, Any] = {"scheduler": settings.scheduler}
    try:
        from distributed import Client

        client = Client(settings.scheduler, timeout=settings.connect_timeout_seconds, set_as_default=False)
    except Exception as err:  # noqa: BLE001 - any failure to connect is the finding
        return [Check("executor", FAIL, f"executor.scheduler: no Dask scheduler answers at {settings.scheduler} "
                      f"({type(err).__name__}: {err})", "start 'dask scheduler' on the server (docs/dask.md) or "
                      "correct executor.scheduler; the daemon refuses to start until it answers", details)]
    try:
        mapped = worker_config(config)
        wanted = [str(settings.to_worker(r.path)) for r in config.watch.roots]
        wanted += [str(p) for p in (mapped.sam.checkpoint, mapped.sam.adapter) if p is not None]
        if config.sam.checkpoint is not None and config.adapter_store.exists():
            wanted.append(str(settings.to_worker(config.adapter_store)))  # registered adapters are read there
        answers = client.run(probe, wanted)
    finally:
        client.close()
    details["workers"] = answers
    if not answers:
        return [Check("executor", WARN, f"the Dask scheduler {settings.scheduler} has no workers: jobs wait",
                      f"start workers: 'dask worker {settings.scheduler} --nthreads 1' on each GPU", details)]
    problems: list[tuple[str, str, str]] = []
    for address, info in sorted(answers.items()):
        if info["version"] != __version__:
            problems.append((FAIL, f"worker {address} runs cellseg1d {info['version']}, this is {__version__}",
                             "install the same cellseg1d version on the workers"))
        if info["missing"]:
            problems.append((FAIL, f"worker {address} ({info['host']}) does not see {', '.join(info['missing'])}",
                             "mount the shared storage on the workers at these paths, or map them with "
                             "[[executor.path_map]] daemon = ... worker = ..."))
    gpus = sum(int(info.get("cuda_devices") or 0) for info in answers.values())
    return [_merge("executor", problems, f"Dask scheduler {settings.scheduler}: {len(answers)} worker(s), "
                   f"{gpus} CUDA device(s) among them, all see the watched folders and model files", details)]
