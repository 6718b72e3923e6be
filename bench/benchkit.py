"""What the daemon benchmarks share: read-only catalog queries and catalog times."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def catalog_rows(state: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of a read-only query on a daemon's SQLite catalog ([] before it exists or has the table)."""
    db = state / "catalog.sqlite"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def utc_ts(value: Any) -> float | None:
    """POSIX time of a catalog datetime (SQLite stores UTC as naive text); None stays None."""
    if value is None:
        return None
    stamp = datetime.fromisoformat(str(value))
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
