"""Text a user hands ctt: one reader for lines, JSON and JSONL (data files, prompts, stdin, metadata), so every path
gets the same checks; every failure is a DataError naming the file and line.

Lines are split on "\\n" only (the lines an editor shows, counted from 1, blank ones included) and decoded as strict
UTF-8. A parsed JSON value must nest less than Python's recursion limit and hold no lone surrogate ("\\ud800": it
cannot be tokenised or written back as UTF-8); both are refused rather than repaired.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ctt.errors import DataError
from ctt.inputs import check_input


def check_text(text: str, where: str) -> str:
    """`text`, refused with a DataError naming `where` when it holds a lone surrogate (not encodable as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: the text holds a lone surrogate {text[e.start]!r} at character {e.start} "
                        "(not valid Unicode text)") from None
    return text


def _decoded(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: line is not valid UTF-8 (byte {e.start})") from None


BOM = "\ufeff"  # a byte-order mark some editors (Notepad) put first: not part of the first line's text


def _lines_of(stream: BinaryIO, name: str) -> Iterator[tuple[str, str]]:
    for lineno, raw in enumerate(stream, start=1):
        line = _decoded(raw, f"{name}:{lineno}").rstrip("\r\n")
        yield f"{name}:{lineno}", line.removeprefix(BOM) if lineno == 1 else line


def read_lines(path: str | Path) -> Iterator[tuple[str, str]]:
    """(`file:line`, text without its line end) for every line of a UTF-8 file, or of stdin for "-"."""
    if str(path) == "-":
        stdin = sys.stdin
        if hasattr(stdin, "buffer"):  # the bytes, decoded strictly here: not the locale's lenient text layer
            yield from _lines_of(stdin.buffer, "stdin")
        else:  # an in-memory text stream (the Python API, tests)
            for lineno, line in enumerate(stdin, start=1):
                line = line.rstrip("\r\n").removeprefix(BOM) if lineno == 1 else line.rstrip("\r\n")
                yield f"stdin:{lineno}", check_text(line, f"stdin:{lineno}")
        return
    check_input(path, "data file", error=DataError, directory=True)  # a device or FIFO is never opened
    try:
        with open(path, "rb") as f:
            yield from _lines_of(f, str(path))
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"data path is a directory, expected a file: {path}") from None
    except OSError as e:  # permissions, a path through a file, I/O errors
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def parse_json(text: str, where: str) -> Any:
    """The JSON value of `text`; a DataError naming `where` for invalid JSON, too deep nesting or a lone surrogate."""
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # C speed; fails on a lone surrogate anywhere inside
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except UnicodeEncodeError:
        raise DataError(f"{where}: JSON holds a lone surrogate escape (e.g. \\ud800): not valid Unicode text") from None
    except ValueError as e:  # e.g. an integer with more digits than Python's limit
        raise DataError(f"{where}: invalid JSON ({e})") from None
    return value


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed row) for every non-blank line of a JSONL file (or stdin for "-")."""
    for where, line in read_lines(path):
        if line.strip():
            yield where, parse_json(line, where)


def read_json(path: str | Path) -> Any:
    """The JSON value of a whole file (metadata such as ctt_export.json), with the checks of `parse_json`."""
    check_input(path, "metadata", error=DataError)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    return parse_json(text, str(path))


def json_line(record: Any) -> str:
    """One JSONL line for `record`; non-ASCII text kept as is, unless it holds a lone surrogate, which is escaped
    (ASCII JSON) so that writing the line as UTF-8 cannot fail."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


def read_yaml(path: str | Path, shape: type = dict) -> Any:
    """A YAML file another run wrote (`.hydra/config.yaml`, `overrides.yaml`) as plain containers, interpolations
    unresolved; a DataError naming the file when it cannot be read or parsed, or is not of `shape` (dict or list).
    OmegaConf's loader is a safe one: a python tag (`!!python/object/apply:...`) is refused, never run."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    check_input(path, "run file", error=DataError)
    try:
        value = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except (yaml.YAMLError, OmegaConfBaseException, ValueError, TypeError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise DataError(f"{path}: {at}not YAML ctt can read ({what})") from None
    if value == {}:  # an empty file
        value = shape()
    if not isinstance(value, shape):
        raise DataError(f"{path}: expected a YAML {'mapping' if shape is dict else 'list'}, "
                        f"got {type(value).__name__}")
    return value


def _integer(value: str) -> bool:
    try:
        return float(value).is_integer()  # "2" or "2.0" (a column pandas widened to float)
    except (TypeError, ValueError):
        return False


def _number(value: str) -> bool:
    try:
        float(value)  # "nan" included: a statistic that had no value
    except (TypeError, ValueError):
        return False
    return True


# A CSV column's kind for `read_csv`: checks a value must pass; "?" allows an empty value.
CSV_KINDS = {"int": _integer, "number": _number}


def read_csv(path: str | Path, required: tuple[str, ...] = (), kinds: dict[str, str] | None = None,
             ragged: bool = False) -> list[dict]:
    """The rows of a CSV file another run wrote (results.csv, comparisons.csv, metrics.csv), values as strings;
    a DataError naming the file and line when it is not UTF-8 CSV, lacks a `required` column, a row lacks a value
    (unless `ragged`), or a value is not of its column's kind (`{"num_continuations": "int", "ci_low": "number?"}`)."""
    import csv

    check_input(path, "run file", error=DataError)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a leading BOM is not in the first column
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: no column {', '.join(map(repr, missing))} (header: {', '.join(header)})")
            checks = [(c, kind.rstrip("?"), kind.endswith("?")) for c, kind in (kinds or {}).items() if c in header]
            rows = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not ragged and (None in row or None in row.values()):
                    raise DataError(f"{where}: the row does not have the header's {len(header)} columns")
                for c, kind, empty_ok in checks:
                    value = row.get(c)
                    if value is not None and not CSV_KINDS[kind](value) and not (empty_ok and not value.strip()):
                        raise DataError(f"{where}: {c} must be {'an integer' if kind == 'int' else 'a number'}, "
                                        f"got {value!r}")
                rows.append(row)
            return rows
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except csv.Error as e:  # a NUL byte, a field over the size limit
        raise DataError(f"{path}: not a CSV file ctt can read ({e})") from None
