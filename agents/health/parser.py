"""Streaming, hardened reader of the Health app's ``export.xml`` (1-3 GB in real life).

It uses expat with only a start-element handler: no element objects are built, the file
is fed in 16 KiB chunks, and memory stays at a chunk plus the ``Harvest`` aggregates.

The export carries an internal DTD, so the XML features that make such files
dangerous are all reachable; each is refused, before anything is expanded or fetched:
- any ``<!ENTITY>`` declaration, general or parameter, internal or external (billion
  laughs, quadratic blow-up, XXE): Apple's DTD declares none;
- a DOCTYPE with a SYSTEM or PUBLIC identifier (an external DTD);
- references to entities that were skipped or left undeclared;
and parameter-entity parsing is switched off, so no external subset is ever read.
Expat itself never opens files or sockets; these checks make sure nothing asks it to.
A single piece of markup larger than ``MAX_TOKEN_BYTES`` is refused too, since expat
would have to buffer it whole.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NoReturn
from xml.parsers import expat

from agents.health.harvest import Harvest

CHUNK_BYTES = 16 << 10  # expat copies each chunk into its own buffer: keep both small
MAX_TOKEN_BYTES = 16 << 20
ROOT = "HealthData"


class ExportError(Exception):
    """The file is not a usable export. Messages never quote the file's content."""


class UnsafeExport(ExportError):
    """The file uses an XML feature that could expand or fetch data: refused."""


def parse_xml(stream: IO[bytes], harvest: Harvest, *, max_bytes: int,
              chunk_bytes: int = CHUNK_BYTES) -> int:
    """Feed the export in ``stream`` to ``harvest``; returns the bytes read."""
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _doctype
    parser.EntityDeclHandler = _entity
    parser.UnparsedEntityDeclHandler = _unparsed
    parser.ExternalEntityRefHandler = _external
    parser.SkippedEntityHandler = _skipped

    def first(name: str, attrs: list[str]) -> None:
        if name != ROOT:
            raise ExportError(f"not an Apple Health export: the root element is not {ROOT}")
        parser.StartElementHandler = harvest.element_list  # from now on, straight to it

    parser.ordered_attributes = True  # a list per element is cheaper than a dict
    parser.StartElementHandler = first
    read = 0
    try:
        while chunk := stream.read(chunk_bytes):
            read += len(chunk)
            if read > max_bytes:
                raise ExportError(f"export larger than the limit of {max_bytes >> 20} MiB")
            parser.Parse(chunk, False)
            if read - parser.CurrentByteIndex > MAX_TOKEN_BYTES:
                raise UnsafeExport(f"a single piece of markup exceeds "
                                   f"{MAX_TOKEN_BYTES >> 20} MiB")
        parser.Parse(b"", True)
    except expat.ExpatError as exc:
        raise ExportError(f"malformed XML at line {exc.lineno}, column {exc.offset}: "
                          f"{expat.ErrorString(exc.code)}") from None
    if harvest.export_date is None:
        raise ExportError("not an Apple Health export: no ExportDate")
    return read


def _doctype(name: str, system_id: str | None, public_id: str | None,
             has_internal_subset: int) -> None:
    if system_id is not None or public_id is not None:
        _refuse("the DOCTYPE refers to an external DTD")
    if name != ROOT:
        raise ExportError(f"not an Apple Health export: DOCTYPE is not {ROOT}")


def _entity(name: str, is_parameter: int, *_rest: object) -> None:
    _refuse(f"the DTD declares {'a parameter' if is_parameter else 'an'} entity")


def _unparsed(*_args: object) -> None:
    _refuse("the DTD declares an unparsed entity")


def _external(*_args: object) -> int:
    _refuse("the document refers to an external entity")


def _skipped(_name: str, _is_parameter: int) -> None:
    _refuse("the document refers to an entity it does not declare")


def _refuse(why: str) -> NoReturn:
    raise UnsafeExport(f"refused: {why}")


@contextmanager
def open_export(path: Path) -> Iterator[IO[bytes]]:
    """The export.xml stream of ``path``: the file itself, or the ``export.xml`` inside
    the Health app's ``export.zip`` (read straight from the archive, never extracted)."""
    if path.suffix.lower() != ".zip":
        with path.open("rb") as stream:
            yield stream
        return
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ExportError("not a zip archive") from None
    with archive:
        members = [m for m in archive.infolist()
                   if m.filename.rsplit("/", 1)[-1] == "export.xml" and not m.is_dir()]
        if len(members) != 1:
            raise ExportError(f"expected one export.xml in the archive, found {len(members)}")
        with archive.open(members[0]) as stream:
            yield stream


def read_export(path: Path, *, retention_days: int | None, max_bytes: int) -> Harvest:
    """Parse one export file (``.xml`` or ``.zip``) into a fresh ``Harvest``."""
    harvest = Harvest(retention_days)
    try:
        with open_export(path) as stream:
            parse_xml(stream, harvest, max_bytes=max_bytes)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:  # a corrupt member, while read
        kind = type(exc)
        raise ExportError(f"corrupt zip archive ({kind.__module__}.{kind.__name__})") from None
    return harvest
