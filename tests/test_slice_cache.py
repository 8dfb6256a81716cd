"""The site's slice cache: same arrays as decoding, re-read on changed content, never an error."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_site import make_site
from pydicom.data import get_testdata_file

import common.dataset as dataset
from common.dataset import LoadedSlice, iter_slices, load_site
from common.demo.hospitals import SITE_PROFILES
from common.demo.hospitals import make_site as make_demo_site
from common.dicom_io import read_ct_slice
from common.errors import SliceError
from common.masks import write_mask
from common.series import scan_folder
from common.slice_cache import (
    CACHE_DIR_NAME,
    SliceCache,
    cache_usage,
    clear_cache,
    compact,
    prune_cache,
    site_fallback_folder,
)
from protocols.classes import ExclusionReason


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.npz"))


def _load_all(
    root: Path, *, with_reference: bool = True
) -> tuple[list[LoadedSlice | SliceError], SliceCache | None]:
    site = load_site(root)
    return list(iter_slices(site, with_reference=with_reference)), site.cache


def _relative(path: Path) -> tuple[str, ...]:
    return path.parts[-2:]  # the same file of a copied site folder


def _assert_same(a: list[LoadedSlice | SliceError], b: list[LoadedSlice | SliceError]) -> None:
    """Every field of every slice equal; arrays equal bit for bit and of the same dtype.

    Paths are compared by their last two parts, so a copy of the site folder compares equal.
    """
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y)
        if isinstance(x, SliceError):
            assert isinstance(y, SliceError) and x.reason == y.reason
            assert _relative(x.path) == _relative(y.path)
            continue
        assert isinstance(y, LoadedSlice)
        for name in ("label", "reference", "raw_label"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is not None:
                assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), name
        assert x.ct.hu.dtype == y.ct.hu.dtype and x.ct.hu.tobytes() == y.ct.hu.tobytes()
        for field in dataclasses.fields(x.ct):
            if field.name == "path":
                assert _relative(x.ct.path) == _relative(y.ct.path)
            elif field.name != "hu":
                assert getattr(x.ct, field.name) == getattr(y.ct, field.name), field.name
        for name in ("index", "row", "group", "height_m", "sex", "label_values"):
            assert getattr(x, name) == getattr(y, name), name


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any decode fail loudly: what loads afterwards came from the cache."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("decoded although the cache holds this slice")

    monkeypatch.setattr(dataset, "read_ct_slice", refuse)
    monkeypatch.setattr(dataset, "read_mask", refuse)


def _set_cache_dir(root: Path, value: str) -> None:
    toml = root / "site.toml"
    lines = toml.read_text(encoding="utf-8").splitlines()
    toml.write_text("\n".join([lines[0], f"cache_dir = {value}", *lines[1:]]) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ hits are the decoded slices
@pytest.mark.parametrize("profile", range(len(SITE_PROFILES)), ids=[p.mask_suffix for p in SITE_PROFILES])
def test_demo_site_hits_are_bit_identical_and_skip_decoding(
    tmp_path: Path, profile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_demo_site(tmp_path / "site", SITE_PROFILES[profile], slices=2, size=48, seed=profile)
    plain = tmp_path / "plain"
    shutil.copytree(root, plain)
    _set_cache_dir(plain, "false")
    reference, none = _load_all(plain)
    assert none is None and not (plain / CACHE_DIR_NAME).exists()
    cold, cache = _load_all(root)
    assert cache is not None and cache.hits == 0 and cache.misses > 0
    _no_decoding(monkeypatch)
    warm, cache = _load_all(root)
    loaded = [item for item in warm if isinstance(item, LoadedSlice)]
    assert loaded and any(item.reference is not None for item in loaded)
    assert cache is not None and cache.misses == 0
    assert cache.hits == sum(1 + (item.reference is not None) for item in loaded)
    _assert_same(reference, cold)
    _assert_same(reference, warm)


def test_real_pydicom_ct_file_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_site(tmp_path, n=1, size=128, label_suffix=".npy")
    shutil.copyfile(get_testdata_file("CT_small.dcm"), root / "ct" / "slice_0.dcm")
    cold, _ = _load_all(root)
    assert isinstance(cold[0], LoadedSlice) and cold[0].ct.slice_location is not None
    _no_decoding(monkeypatch)
    warm, cache = _load_all(root)
    assert cache is not None and cache.hits == 1
    _assert_same(cold, warm)


def test_entries_hold_no_file_name(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=32, name="site-CANARY7")
    (root / "ct" / "slice_0.dcm").rename(root / "ct" / "CANARY7-ct.dcm")
    manifest = root / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("ct/slice_0.dcm", "ct/CANARY7-ct.dcm"))
    _load_all(root)
    entries = _entries(root / CACHE_DIR_NAME)
    assert entries and all(b"CANARY7" not in path.read_bytes() for path in entries)


# ------------------------------------------------------------------ invalidation
def test_changed_bytes_are_reread_even_with_same_size_and_mtime(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=32, label_suffix=".npy")
    image, label = root / "ct" / "slice_0.dcm", root / "labels" / "slice_0.npy"
    before, _ = _load_all(root)
    first = before[0]
    assert isinstance(first, LoadedSlice)
    stats = {path: path.stat() for path in (image, label)}
    data = bytearray(image.read_bytes())  # PixelData ends the file: raise its last 32 pixels by 1
    data[-64:] = (np.frombuffer(bytes(data[-64:]), dtype="<i2") + 1).astype("<i2").tobytes()
    image.write_bytes(bytes(data))
    changed = first.raw_label.copy()
    changed[changed == 7] = 1  # subcutaneous fat becomes muscle
    write_mask(label, changed)
    for path, old in stats.items():
        assert path.stat().st_size == old.st_size  # same size: only the content tells
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    after, cache = _load_all(root)
    second = after[0]
    assert isinstance(second, LoadedSlice) and cache is not None and cache.hits == 0
    np.testing.assert_array_equal(second.ct.hu, read_ct_slice(image).hu)
    assert (second.ct.hu - first.ct.hu).ravel()[-32:].tolist() == [1.0] * 32
    assert 2 not in second.label  # no subcutaneous fat left: the new mask was read
    assert 2 in first.label


def test_label_map_change_invalidates(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=2, size=32)
    before, _ = _load_all(root)
    toml = root / "site.toml"
    toml.write_text(
        toml.read_text().replace("muscle = [1]", "muscle = [1, 2]").replace("background = [2]", "")
    )
    after, cache = _load_all(root)
    assert cache is not None and cache.hits == 0
    for old, new in zip(before, after, strict=True):
        assert isinstance(old, LoadedSlice) and isinstance(new, LoadedSlice)
        imat = old.raw_label == 2
        assert imat.any() and (new.label[imat] == 1).all() and (old.label[imat] == 0).all()


def test_corrupt_entry_is_a_miss_and_is_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_site(tmp_path, n=2, size=32)
    cold, _ = _load_all(root, with_reference=False)
    entries = _entries(root / CACHE_DIR_NAME)
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    entries[1].write_bytes(b"not a zip file at all")
    again, cache = _load_all(root, with_reference=False)
    assert cache is not None and cache.corrupt == 2 and cache.hits == 0
    assert "cannot be read" in caplog.text
    _assert_same(cold, again)
    warm, cache = _load_all(root, with_reference=False)
    assert cache is not None and cache.hits == 2  # rewritten whole
    _assert_same(cold, warm)


def test_entry_of_another_key_is_not_used(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=2, size=32)
    cold, _ = _load_all(root, with_reference=False)
    first, second = _entries(root / CACHE_DIR_NAME)
    shutil.copyfile(first, second)  # a misplaced entry: right place, another slice's arrays
    again, cache = _load_all(root, with_reference=False)
    assert cache is not None and cache.corrupt == 1 and cache.hits == 1
    _assert_same(cold, again)


# ------------------------------------------------------------------ where it lives
def test_unwritable_site_folder_falls_back_to_sarcofed_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARCOFED_HOME", str(tmp_path / "home"))
    root = make_site(tmp_path, n=1, size=32)
    (root / CACHE_DIR_NAME).write_text("a file where the cache folder would go")
    cold, cache = _load_all(root)
    assert cache is not None and cache.folder == site_fallback_folder(root)
    assert cache.folder.is_relative_to(tmp_path / "home" / "cache")
    warm, cache = _load_all(root)
    assert cache is not None and cache.hits == 1
    _assert_same(cold, warm)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_site_folder_falls_back_to_sarcofed_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARCOFED_HOME", str(tmp_path / "home"))
    root = make_site(tmp_path, n=1, size=32)
    root.chmod(0o555)
    try:
        _, cache = _load_all(root)
        assert cache is not None and cache.folder == site_fallback_folder(root)
        assert not (root / CACHE_DIR_NAME).exists()
    finally:
        root.chmod(0o755)


@pytest.mark.parametrize("value", ["false", '""', '"off"'])
def test_disabled_cache_decodes_and_writes_nothing(
    tmp_path: Path, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARCOFED_HOME", str(tmp_path / "home"))
    root = make_site(tmp_path, n=2, size=32)
    _set_cache_dir(root, value)
    items, cache = _load_all(root)
    assert cache is None and all(isinstance(item, LoadedSlice) for item in items)
    assert not (root / CACHE_DIR_NAME).exists() and not (tmp_path / "home").exists()


def test_cache_dir_setting_moves_the_cache(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=32)
    _set_cache_dir(root, '"../elsewhere"')
    _, cache = _load_all(root)
    assert cache is not None and cache.folder == root / ".." / "elsewhere"
    assert len(_entries(tmp_path / "elsewhere")) == 1 and not (root / CACHE_DIR_NAME).exists()


def test_cache_files_are_not_site_data(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=2, size=32, label_suffix=".dcm")
    _load_all(root)
    assert _entries(root / CACHE_DIR_NAME)
    listing = scan_folder(root)
    seen = [h.path for s in listing.series for h in s.slices] + [s.path for s in listing.skipped]
    assert seen and not any(CACHE_DIR_NAME in path.parts for path in seen)


def test_clear_removes_entries_only(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=2, size=32)
    _load_all(root)
    folder = root / CACHE_DIR_NAME
    (folder / "notes.txt").write_text("kept")
    assert cache_usage(folder).entries == 2
    removed = clear_cache(folder)
    assert removed.entries == 2 and removed.bytes > 0
    assert cache_usage(folder).entries == 0 and (folder / "notes.txt").read_text() == "kept"


def test_unusable_file_is_refused_with_its_reason_not_cached(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=32)
    os.remove(root / "ct" / "slice_0.dcm")
    os.mkfifo(root / "ct" / "slice_0.dcm")  # never hashed: a FIFO read would block
    items, cache = _load_all(root)
    assert isinstance(items[0], SliceError) and items[0].reason is not ExclusionReason.empty_mask
    assert cache is not None and cache.hits == 0 and not _entries(root / CACHE_DIR_NAME)


# ------------------------------------------------------------------ size cap
def _noise(seed: int, size: int = 64) -> dict[str, np.ndarray]:
    """Arrays that do not compress: each entry is ~size*size*4 bytes on disk."""
    return {"hu": np.random.default_rng(seed).random((size, size), dtype=np.float32)}


def test_prune_removes_the_least_recently_used_until_the_cache_fits(tmp_path: Path) -> None:
    cache = SliceCache((tmp_path,), max_bytes=10**9)  # no pruning while filling
    keys = [f"{i:02x}" + "0" * 62 for i in range(6)]
    for i, key in enumerate(keys):
        cache.put(key, _noise(i))
        os.utime(tmp_path / key[:2] / f"{key}.npz", (1000 + i, 1000 + i))  # written in this order
    entry_bytes = cache_usage(tmp_path).bytes // 6
    assert cache.get(keys[0]) is not None  # the oldest is used again: now the most recent
    removed = prune_cache(tmp_path, max_bytes=3 * entry_bytes + entry_bytes // 2)
    assert removed.entries == 3 and removed.bytes >= 3 * entry_bytes - 100
    left = {path.stem for path in _entries(tmp_path)}
    assert left == {keys[0], keys[4], keys[5]}  # keys 1-3 were the least recently used
    assert prune_cache(tmp_path, max_bytes=10**9).entries == 0  # a cache that fits loses nothing


def test_a_capped_cache_never_holds_much_more_than_its_cap(tmp_path: Path) -> None:
    probe = SliceCache((tmp_path / "probe",))
    probe.put("ff" + "0" * 62, _noise(0))
    entry_bytes = cache_usage(tmp_path / "probe").bytes
    cap = 5 * entry_bytes
    cache = SliceCache((tmp_path / "capped",), max_bytes=cap)
    for i in range(40):
        cache.put(f"{i:02x}" + "1" * 62, _noise(i))
    held = cache_usage(tmp_path / "capped").bytes
    # pruned at the first write and after each 5% of the cap: never over by more than that
    assert held <= cap + max(entry_bytes, int(cap * 0.05)), (held, cap)
    assert cache.evicted >= 40 - 6
    assert cache.get(f"{39:02x}" + "1" * 62) is not None  # the newest entry is kept


def test_site_toml_cache_max_mb_reaches_the_cache(tmp_path: Path) -> None:
    from common.errors import SiteFolderError

    root = make_site(tmp_path, n=1, size=32)
    site = load_site(root)
    assert site.cache is not None and site.cache.max_bytes == 10_240 * 2**20  # the default
    original = (root / "site.toml").read_text(encoding="utf-8")
    _set_cache_dir(root, "true\ncache_max_mb = 64")
    site = load_site(root)
    assert site.cache is not None and site.cache.max_bytes == 64 * 2**20
    (root / "site.toml").write_text(original, encoding="utf-8")
    _set_cache_dir(root, "true\ncache_max_mb = 0")
    with pytest.raises(SiteFolderError, match="cache_max_mb"):
        load_site(root)


# ------------------------------------------------------------------ concurrent ClientApps
def _write_many(folder: str, key: str, seed: int, start: object) -> None:
    cache = SliceCache((Path(folder),))
    arrays = {"hu": np.full((256, 256), float(seed), dtype=np.float32)}
    start.wait()  # type: ignore[attr-defined]
    for _ in range(40):
        cache.put(key, arrays)
        got = cache.get(key)
        assert got is not None and got["hu"].shape == (256, 256)


def test_concurrent_writers_leave_a_whole_entry(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    key = "ab" + "0" * 62
    workers = [context.Process(target=_write_many, args=(str(tmp_path), key, seed, start)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    cache = SliceCache((tmp_path,))
    got = cache.get(key)
    assert got is not None and cache.corrupt == 0
    assert np.unique(got["hu"]).tolist() in ([1.0], [2.0])  # one writer's whole array
    assert not list(tmp_path.glob("*/.tmp-*"))


def test_site_cache_command_shows_and_clears(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    root = make_site(tmp_path, n=2, size=32)
    _load_all(root)
    shown = CliRunner().invoke(app, ["site", "cache", str(root), "--json"])
    assert shown.exit_code == 0, shown.output
    assert [f["entries"] for f in json.loads(shown.output)["folders"]] == [2]
    cleared = CliRunner().invoke(app, ["site", "cache", str(root), "--clear"])
    assert cleared.exit_code == 0 and "removed 2 entries" in cleared.output
    assert not _entries(root / CACHE_DIR_NAME)
    items, cache = _load_all(root)  # decoded again
    assert cache is not None and cache.misses == 2 and all(isinstance(i, LoadedSlice) for i in items)


def test_compact_keeps_every_bit() -> None:
    whole = np.array([[-1024.0, 0.0], [3071.0, 45.0]], dtype=np.float32)
    assert compact(whole).dtype == np.int16 and compact(whole).astype(np.float32).tobytes() == whole.tobytes()
    for kept in (
        np.array([[-0.0, 1.0]], dtype=np.float32),  # -0.0 is not 0 bit for bit
        np.array([[0.5, 1.0]], dtype=np.float32),
        np.array([[np.nan, 1.0]], dtype=np.float32),
        np.array([[0, 70000]], dtype=np.int64),
    ):
        assert compact(kept).dtype == kept.dtype
    assert compact(np.array([[0, 7, 255]], dtype=np.int64)).dtype == np.uint8


IMPORTS_CACHE = re.compile(
    r"^\s*(from common\.slice_cache import|import common\.slice_cache|from common import .*slice_cache)", re.M
)


def test_only_the_dataset_reads_the_cache() -> None:
    """Replies are built from decoded slices: no task, guard or server module opens the cache."""
    repo = Path(__file__).resolve().parents[1]
    users = sorted(
        path.relative_to(repo).as_posix()
        for package in ("protocols", "common", "client", "server")
        for path in (repo / package).rglob("*.py")
        if IMPORTS_CACHE.search(path.read_text(encoding="utf-8"))
    )
    # the dataset reads and writes entries; the CLI only counts and deletes them
    assert users == ["client/site_ops_cli.py", "common/dataset.py"]
