"""One JSON object per line: the reading shared by `ul2 infer`'s input files and the
supervised tasks' JSONL sources, with errors that name the file and line."""

from __future__ import annotations

import json
from typing import Any


def parse_object(line: str, where: str) -> dict[str, Any]:
  """The JSON object on `line`; a one-line ValueError prefixed by `where` (`file:n`)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
  if not isinstance(record, dict):
    raise ValueError(f"{where}: not a JSON object")
  return record
