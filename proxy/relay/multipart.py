"""The form fields at the head of a multipart upload (audio), found without buffering it.

The proxy needs an upload's `model` (to route it) and `stream` (to meter it) but not its
file: it reads the body until those fields have gone by, then streams the rest through.
OpenAI's SDKs (httpx, and node's form-data) send the plain fields before the files, so
this is usually the first few hundred bytes. Pure functions over bytes.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(rb'boundary="?([^";,\s]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'name="([^"]*)"', re.IGNORECASE)
# Give up looking for the fields after this many bytes (they come after the file): the
# upload is then routed to the default backend.
MAX_SCAN_BYTES = 256 * 1024


def boundary_of(content_type: bytes | None) -> bytes | None:
    """The multipart boundary of a `Content-Type`, or None when it is not multipart."""
    if not content_type or not content_type.lower().startswith(b"multipart/form-data"):
        return None
    m = _BOUNDARY.search(content_type)
    return m.group(1) if m else None


def complete_fields(head: bytes, boundary: bytes) -> tuple[dict[str, str], bool]:
    """The plain (non-file) fields whose part is complete in `head`, and whether a file
    part has begun (fields after it are out of reach without reading the file)."""
    delimiter = b"--" + boundary
    parts = head.split(delimiter)
    fields: dict[str, str] = {}
    file_seen = False
    # parts[0] is the preamble; the last part may be incomplete (no delimiter after it).
    for i, part in enumerate(parts[1:], start=1):
        head_end = part.find(b"\r\n\r\n")
        if head_end < 0:
            break
        part_headers = part[:head_end].lower()
        if b"filename=" in part_headers:
            file_seen = True
            break
        if i == len(parts) - 1:
            break  # its value may go on in the next chunk
        m = _NAME.search(part[:head_end])
        if m is not None:
            value = part[head_end + 4 :].removesuffix(b"\r\n")
            fields[m.group(1).decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return fields, file_seen
