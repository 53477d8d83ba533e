"""Named variants of our experiment for the benches' ``--variants`` option."""

from __future__ import annotations

import sys
from collections.abc import Collection


def parse_variants(text: str, reserved: Collection[str]) -> dict[str, list[str]]:
    """``name:key=value,key=[1,2];name2:...`` -> ``{name: [dotted overrides]}``; a name may not
    be one of ``reserved`` (the bench's own rows or recipes). A malformed one: one line, exit 2."""
    variants = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, overrides = part.partition(":")
        if not name or name in reserved or not overrides:
            print(f"--variants: expected name:key=value[,key=value] with a name not in "
                  f"{', '.join(reserved)}, got {part!r}", file=sys.stderr)
            raise SystemExit(2)
        variants[name] = _split_overrides(overrides)
    return variants


def _split_overrides(text: str) -> list[str]:
    """``a=1,b=[2,3]`` -> ``["a=1", "b=[2,3]"]``: commas inside brackets belong to a list."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]
