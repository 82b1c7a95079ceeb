"""What every part of the test server shares: its errors, its log, Go's time format."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHUNK = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def log(message: str) -> None:
    print(f"[ollama-test-server] {message}", file=sys.stderr, flush=True)


def go_time(ns: int) -> str:
    """A time as Go's JSON writes it (RFC 3339 with nanoseconds, trailing zeros dropped, local zone)."""
    moment = datetime.fromtimestamp(ns // 10**9).astimezone()
    fraction = f"{ns % 10**9:09d}".rstrip("0")
    offset = moment.strftime("%z")
    zone = "Z" if offset == "+0000" else f"{offset[:3]}:{offset[3:]}"
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + zone


def now_go() -> str:
    return go_time(time.time_ns())
