"""Public-domain English text for perplexity: Jane Austen's novels, fetched once and cached.

The text comes from Debian's `r-cran-janeaustenr` package (the R data set `janeaustenr`), downloaded
with `apt-get download` (no R needed) and read with the `rdata` package; it is cached as plain text
under `attnpatch.models.cache_dir() / "texts"`. Nothing is committed to the repository.
"""

from __future__ import annotations

import gzip
import subprocess
import tempfile
import zlib
from pathlib import Path

from attnpatch.models import cache_dir

NOVELS = ("prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey", "persuasion")
_PACKAGE = "r-cran-janeaustenr"
_DATA = "usr/lib/R/site-library/janeaustenr/data"


def _extract(names: tuple[str, ...], target: Path) -> None:
    try:
        import rdata
    except ImportError as e:
        raise FileNotFoundError("reading the Austen data needs the `rdata` package: pip install rdata") from e
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", _PACKAGE], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob(f"{_PACKAGE}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as e:
            raise FileNotFoundError(
                f"could not fetch {_PACKAGE} with apt-get download (Debian/Ubuntu only): {e}") from e
        data = Path(tmp) / _DATA
        rdb = (data / "Rdata.rdb").read_bytes()
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
        for name, (offset, length) in index["variables"].items():
            if name in names:
                raw = zlib.decompress(rdb[int(offset) + 4 : int(offset) + int(length)])
                lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
                (target / f"{name}.txt").write_text("\n".join(str(x) for x in lines))


def austen(novel: str = "prideprejudice") -> str:
    """The full text of one of `NOVELS` (public domain)."""
    if novel not in NOVELS:
        raise ValueError(f"unknown novel {novel!r}; choose from {', '.join(NOVELS)}")
    folder = cache_dir() / "texts" / "austen"
    path = folder / f"{novel}.txt"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _extract(NOVELS, folder)
    return path.read_text()
