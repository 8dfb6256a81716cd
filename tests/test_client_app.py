"""The ClientApp handler in process: one parse of the site per message, the guard screening
what that parse read, and simulated sites that are read, never made."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from clientapp_messages import handle, payload_of
from fixtures_site import make_site

import common.dataset
from protocols import keys

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_site(tmp_path, n=5, size=32, with_reference=True, name="hospital-a")


@pytest.mark.parametrize("task", ["identify", "compare"])
def test_each_message_parses_the_site_folder_once(
    site: Path, task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []
    real = common.dataset._read_manifest

    def counting(root: Path) -> object:
        reads.append(root)
        return real(root)

    monkeypatch.setattr(common.dataset, "_read_manifest", counting)
    reply = payload_of(handle(task, {"site-dir": str(site)}))
    assert reply["site"] == "hospital-a"
    assert reads == [site]


def test_a_semicolon_manifest_is_screened_like_any_other(site: Path) -> None:
    """manifest.csv with ';' and upper-case headers; the site's name is one of its file names.
    The dataset reads it, so the guard must screen for what it read: the reply is refused."""
    with (site / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with (site / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=";")
        writer.writerow([name.upper() for name in rows[0]])
        writer.writerows(row.values() for row in rows)
    toml = (site / "site.toml").read_text(encoding="utf-8")
    (site / "site.toml").write_text(toml.replace('"hospital-a"', '"slice_3.dcm"'), encoding="utf-8")
    assert len(common.dataset.load_site(site)) == 5

    reply = handle("compare", {"site-dir": str(site)})
    assert reply.has_error() and reply.error.code == keys.ERROR_REFUSED
    reason = reply.error.reason or ""
    assert "manifest.csv" in reason and "slice_3" not in reason


def test_a_simulated_site_that_does_not_exist_is_not_made_and_the_reason_says_how(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo-sites"
    node = {"partition-id": 1, "num-partitions": 2}
    reply = handle("identify", node, run_config={"demo.dir": str(demo_dir)})
    assert reply.has_error() and reply.error.code == keys.ERROR_FAILED
    reason = reply.error.reason or ""
    assert "sarcofed study demo --make-only" in reason and str(demo_dir / "site-1") in reason
    assert not demo_dir.exists()


def test_a_simulated_site_is_read_from_demo_dir(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo-sites"
    make_site(demo_dir, n=2, size=32, name="site-1")
    node = {"partition-id": 1, "num-partitions": 2}
    reply = payload_of(handle("identify", node, run_config={"demo.dir": str(demo_dir)}))
    assert reply == {"site": "site-1", "n_listed": 2}


def test_one_unreadable_slice_does_not_fail_the_sites_reply(site: Path) -> None:
    """A single-valued PixelSpacing and a NUL byte in a path once failed the whole compare reply."""
    import pydicom

    with (site / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    ds = pydicom.dcmread(site / rows[0]["image"])
    ds.PixelSpacing = "0.7"
    ds.save_as(site / rows[0]["image"])
    rows[1]["image"] = "ct/slice\x00_1.dcm"
    with (site / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (site / "policy.toml").write_text("min-slices = 3\nmin-patients = 3\n")  # 5 rows, 2 broken
    reply = handle("compare", {"site-dir": str(site)})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    payload = payload_of(reply)
    assert payload["n_used"] == 3 and payload["excluded"] == {"no_pixel_spacing": 1, "missing_file": 1}
