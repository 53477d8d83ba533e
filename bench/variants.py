"""Named variants of our experiment for the benches' ``--variants`` option."""

from __future__ import annotations

import sys
from collections.abc import Collection


def parse_variants(text: str, reserved: Collection[str]) -> dict[str, list[str]]:
    """``name:key=value,key=value;name2:...`` -> ``{name: [dotted overrides]}``; a name may not
    be one of ``reserved`` (the bench's own rows or recipes). A malformed one: one line, exit 2."""
    variants = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, overrides = part.partition(":")
        if not name or name in reserved or not overrides:
            print(f"--variants: expected name:key=value[,key=value] with a name not in "
                  f"{', '.join(reserved)}, got {part!r}", file=sys.stderr)
            raise SystemExit(2)
        variants[name] = overrides.split(",")
    return variants
