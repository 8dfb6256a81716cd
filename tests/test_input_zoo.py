"""The input zoo: a site of ~500 rows where every row but a few is broken in its own way.

Rows (built in a temp folder, files under ``data/``):

- good: a demo hospital (6 slices, 64 px, with reference masks), and one of its slices again
  with a reference mask of the wrong shape (usable, but not by compare);
- every pydicom test file as an image (with a mask of its own size) and as a DICOM SEG mask
  (of a copy of a good image); some are valid CT slices and are used, the rest are not CT,
  not 2-D, compressed without a decoder, ... and are excluded;
- every file of nibabel's tests/data as a mask, and some as images;
- each case of issue 14 item 3 (single-valued / huge PixelSpacing, RescaleSlope 1000, a
  5,000-character path, a NUL byte, a FIFO and a /dev/zero link as image and as mask,
  complex and uint64 masks, duplicates, an unbalanced quote) and plainly broken files
  (truncated, zero-byte, wrong type, a folder, a sparse 65 MiB file, paths outside the site).

``check``, ``compare``, ``evaluate`` and ``train`` run on it (check and compare through the
real CLI) within a time limit, with no traceback, each bad row excluded with a reason naming
its file; their results equal those of a clean site holding only the usable rows.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from typer.testing import CliRunner

from common.check import display_text
from common.demo.hospitals import make_site, site_profile
from common.masks import write_mask
from common.site_file import MAX_FILE_BYTES
from protocols.payloads import EvaluationPayload
from server.cli import app

pytestmark = pytest.mark.timeout(600)  # about 35 s on two shared cores; a hang fails, never blocks

runner = CliRunner()
COLUMNS = ("image", "label", "reference", "group", "height_m", "sex")
MANIFEST = "manifest.csv"
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Zoo:
    root: Path
    clean: Path
    #: manifest line -> the row's cells, for every row expected to be excluded in check
    bad: dict[int, dict[str, str]] = field(default_factory=dict)
    #: manifest line -> cells of the rows that may be used or excluded (pydicom's own files)
    either: dict[int, dict[str, str]] = field(default_factory=dict)
    good: dict[int, dict[str, str]] = field(default_factory=dict)
    #: the line of the row whose reference mask has the wrong shape (a good row)
    bad_reference_line: int = 0
    quote_line: int = 0


def _row(image: str, label: str, reference: str = "", group: str = "") -> dict[str, str]:
    return {"image": image, "label": label, "reference": reference, "group": group, "height_m": "", "sex": ""}


def _write(root: Path, rows: list[dict[str, str]], tail: str = "") -> None:
    with (root / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        handle.write(tail)


def _mask_for(path: Path) -> np.ndarray:
    """A mask of the image's own size (from its header when there is one), muscle in the middle."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        shape = (int(ds.Rows), int(ds.Columns))
    except Exception:
        shape = (8, 8)
    if not 0 < shape[0] * shape[1] <= 2048 * 2048:
        shape = (8, 8)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[shape[0] // 4 : max(shape[0] * 3 // 4, 1), shape[1] // 4 : max(shape[1] * 3 // 4, 1)] = 1
    return mask


def _build(tmp: Path) -> Zoo:
    root, clean = tmp / "zoo", tmp / "clean"
    data = root / "data"
    demo = make_site(data / "demo", site_profile(1), slices=6, size=64, seed=5)
    for name in ("site.toml", "policy.toml"):
        shutil.copy(demo / name, root / name)
    with (demo / MANIFEST).open(newline="") as handle:
        demo_rows = [
            {k: f"data/demo/{v}" if k in ("image", "label", "reference") else v for k, v in r.items()}
            for r in csv.DictReader(handle)
        ]
    first = demo_rows[0]
    demo_image, demo_label = root / first["image"], root / first["label"]

    rows: list[dict[str, str]] = []
    kinds: list[str] = []

    def add(row: dict[str, str], kind: str) -> None:
        rows.append(row)
        kinds.append(kind)

    copies = data / "copies"
    copies.mkdir()
    counter = iter(range(10_000))

    def good_copy(*, label: bool = True) -> tuple[str, str]:
        """A fresh copy of a good image (and its label): a row of its own, not a duplicate."""
        n = next(counter)
        shutil.copy(demo_image, copies / f"ct_{n}.dcm")
        if label:
            shutil.copy(demo_label, copies / f"label_{n}.png")
        return f"data/copies/ct_{n}.dcm", f"data/copies/label_{n}.png"

    for row in demo_rows:
        add(row, "good")
    # a good slice whose reference mask has the wrong shape: usable, but compare drops it
    image, label = good_copy()
    write_mask(copies / "ref_wrong_shape.npy", np.ones((10, 10), dtype=np.int64))
    add(_row(image, label, "data/copies/ref_wrong_shape.npy", "refshape"), "good-bad-reference")

    # every pydicom test file, as an image (with a mask of its size) and as a SEG mask
    pydicom_dir = data / "pydicom"
    pydicom_dir.mkdir()
    for i, source in enumerate(sorted(f for f in get_testdata_files() if Path(f).is_file())):
        name = f"{i:03d}_{Path(source).name}"
        shutil.copy(source, pydicom_dir / name)
        write_mask(pydicom_dir / f"{i:03d}_mask.png", _mask_for(Path(source)))
        add(_row(f"data/pydicom/{name}", f"data/pydicom/{i:03d}_mask.png", group=f"pyd-{i}"), "either")
        image, _ = good_copy(label=False)
        add(_row(image, f"data/pydicom/{name}"), "bad")  # not a SEG of that image

    # every file of nibabel's test data as a mask, and the NIfTI ones as images
    nib_dir = data / "nibabel"
    nib_dir.mkdir()
    for source in sorted(p for p in NIBABEL_DATA.iterdir() if p.is_file()):
        shutil.copy(source, nib_dir / source.name)
        image, _ = good_copy(label=False)
        add(_row(image, f"data/nibabel/{source.name}"), "bad")
        if source.name.endswith((".nii", ".nii.gz", ".hdr", ".mnc", ".dcm", ".mgz")):
            add(_row(f"data/nibabel/{source.name}", label), "bad")

    # the cases of issue 14
    def edited(**values: object) -> tuple[str, str]:
        image, label = good_copy()
        ds = pydicom.dcmread(root / image)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(root / image)
        return image, label

    for values in (
        {"PixelSpacing": "0.7"},
        {"PixelSpacing": ["1e15", "1e15"]},
        {"PixelSpacing": ["700", "700"]},
        {"PixelSpacing": ["0.0007", "0.0007"]},
        {"RescaleSlope": "1000"},
        {"Modality": "MR"},
        {"NumberOfFrames": "3"},
        {"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]},
    ):
        add(_row(*edited(**values)), "bad")
    image, label = good_copy()
    add(_row("data/" + "a" * 5000 + ".dcm", label), "bad")
    add(_row("data/copies/ct\x00.dcm", label), "bad")
    add(_row(image, "data/copies/mask\x00.png"), "bad")
    for target, how in (("fifo", os.mkfifo), ("zero", lambda p: os.symlink("/dev/zero", p))):
        how(copies / f"{target}.dcm")
        how(copies / f"{target}.png")
        add(_row(f"data/copies/{target}.dcm", good_copy()[1]), "bad")
        add(_row(good_copy()[0], f"data/copies/{target}.png"), "bad")
    for dtype, fill in ((np.complex128, 1 + 1j), (np.uint64, 2**63), (np.float64, 0.5), (np.int64, -3)):
        mask = np.zeros((64, 64), dtype=dtype)
        mask[20:40, 20:40] = fill
        n = next(counter)
        np.save(copies / f"odd_{n}.npy", mask)
        add(_row(good_copy()[0], f"data/copies/odd_{n}.npy"), "bad")
    # broken files
    truncated, _ = good_copy()
    (root / truncated).write_bytes((demo_image.read_bytes())[:2000])
    add(_row(truncated, label), "bad")
    empty_image, _ = good_copy()
    (root / empty_image).write_bytes(b"")
    add(_row(empty_image, label), "bad")
    (copies / "empty.png").write_bytes(b"")
    add(_row(good_copy()[0], "data/copies/empty.png"), "bad")
    shutil.copy(demo_label, copies / "png_as.dcm")
    add(_row("data/copies/png_as.dcm", label), "bad")
    shutil.copy(demo_image, copies / "dicom_as.png")
    add(_row(good_copy()[0], "data/copies/dicom_as.png"), "bad")
    (copies / "text.npy").write_text("not an array\n")
    add(_row(good_copy()[0], "data/copies/text.npy"), "bad")
    (copies / "folder.dcm").mkdir()
    add(_row("data/copies/folder.dcm", label), "bad")
    with (copies / "sparse.dcm").open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)
    add(_row("data/copies/sparse.dcm", label), "bad")
    add(_row("data/copies/missing.dcm", label), "bad")
    add(_row("/etc/passwd", label), "bad")
    add(_row("../outside.dcm", label), "bad")
    (copies / "label.xyz").write_bytes(b"P5 64 64 255\n")
    add(_row(good_copy()[0], "data/copies/label.xyz"), "bad")
    add({**_row(*good_copy()), "height_m": "abc"}, "bad")
    add(dict(demo_rows[1]), "bad")  # a duplicate of a good row
    add({**demo_rows[2], "image": "./" + demo_rows[2]["image"]}, "bad")  # the same, spelt otherwise

    quote_image, quote_label = good_copy()
    quote_line = len(rows) + 2
    _write(root, rows, tail=f'"{quote_image},{quote_label},,,,\n')
    zoo = Zoo(root=root, clean=clean, quote_line=quote_line)
    for line, (row, kind) in enumerate(zip(rows, kinds, strict=True), start=2):
        if kind.startswith("good"):
            zoo.good[line] = row
        elif kind == "either":
            zoo.either[line] = row
        else:
            zoo.bad[line] = row
        if kind == "good-bad-reference":
            zoo.bad_reference_line = line
    zoo.bad[quote_line] = _row(quote_image, quote_label)
    return zoo


def _write_clean(zoo: Zoo, used_either: list[int]) -> None:
    """The clean site: the same files (its ``data`` links to the zoo's), only the usable rows."""
    zoo.clean.mkdir()
    (zoo.clean / "data").symlink_to(zoo.root / "data")
    for name in ("site.toml", "policy.toml"):
        shutil.copy(zoo.root / name, zoo.clean / name)
    lines = sorted([*zoo.good, *used_either])
    rows = [dict(zoo.good.get(line) or zoo.either[line]) for line in lines]
    for row in rows:
        if row["reference"].endswith("ref_wrong_shape.npy"):
            row["reference"] = ""  # compare excludes this row in both (unreadable / no reference)
    _write(zoo.clean, rows)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return _build(tmp_path_factory.mktemp("zoo"))


def _cli(*args: str) -> dict[str, object]:
    result = runner.invoke(app, [*args, "--json"])
    assert "Traceback" not in result.output, result.output[-3000:]
    assert result.exit_code == 0, result.output[-3000:]
    return json.loads(result.stdout)


def _payload_core(payload: EvaluationPayload) -> dict[str, object]:
    """What the usable rows decide: everything but the counts of listed and excluded rows, and the
    runtime (a site with more listed rows segments on ONNX Runtime, common.device.Compute.for_slices;
    the scores must not differ for it)."""
    return payload.model_dump(exclude={"n_listed", "excluded", "dataset_fingerprint", "compute"})


def test_the_zoo(zoo: Zoo) -> None:
    assert len(zoo.bad) + len(zoo.either) + len(zoo.good) > 300

    # --- check, through the real CLI in its own process (its stderr is what a user sees)
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "site", "check", str(zoo.root), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    problems: dict[int, dict[str, object]] = {}
    for problem in report["problems"]:  # type: ignore[union-attr]
        assert problem["line"] not in problems, f"two problems for line {problem['line']}"
        problems[problem["line"]] = problem
    for line, row in zoo.bad.items():
        assert line in problems, f"bad row on line {line} was used: {row}"
        problem = problems[line]
        named = {display_text(row["image"]), display_text(row["label"]), display_text(row["reference"])}
        if problem["file"] == MANIFEST:  # a row-level problem: the detail names the line's content
            assert problem["reason"] in ("invalid_manifest_row", "duplicate_row"), problem
        else:
            assert problem["file"] in named, (problem, row)
        assert problem["detail"], problem
    assert set(problems) - set(zoo.bad) <= set(zoo.either), "a good row was excluded"
    for line in set(problems) & set(zoo.either):
        row = zoo.either[line]
        assert problems[line]["file"] in (display_text(row["image"]), display_text(row["label"])), row
    dup_detail = {str(p["detail"]) for p in problems.values() if p["reason"] == "duplicate_row"}
    assert len(dup_detail) == 2 and all("already listed on line" in d for d in dup_detail)
    assert "unbalanced quote" in str(problems[zoo.quote_line]["detail"])
    (ref_problem,) = report["reference_problems"]  # type: ignore[misc]
    assert ref_problem["line"] == zoo.bad_reference_line and ref_problem["reason"] == "unreadable_reference"

    used_either = [line for line in zoo.either if line not in problems]
    for line in used_either:  # only single-frame CT slices of pydicom's may be used
        ds = pydicom.dcmread(zoo.root / zoo.either[line]["image"], stop_before_pixels=True)
        assert ds.Modality == "CT" and int(ds.get("NumberOfFrames", 1) or 1) == 1, zoo.either[line]
    assert any(zoo.either[line]["image"].endswith("CT_small.dcm") for line in used_either)
    _write_clean(zoo, used_either)

    clean_report = _cli("site", "check", str(zoo.clean))
    assert report["n_usable"] == clean_report["n_usable"] == len(zoo.good) + len(used_either)
    for key in ("classes", "background_values", "pixel_spacing", "image_sizes", "label_audit", "n_groups"):
        assert report[key] == clean_report[key], key

    # --- compare, through the CLI
    zoo_compare = EvaluationPayload.model_validate(_cli("site", "compare", str(zoo.root)))
    clean_compare = EvaluationPayload.model_validate(_cli("site", "compare", str(zoo.clean)))
    assert _payload_core(zoo_compare) == _payload_core(clean_compare)
    assert zoo_compare.n_used == 6  # the demo rows: the only ones with a usable reference
    assert sum(zoo_compare.excluded.values()) == zoo_compare.n_listed - zoo_compare.n_used

    # --- train (1 epoch, tiny model, every patient trains) and evaluate, through the CLI
    summaries = {}
    for name, site in (("zoo", zoo.root), ("clean", zoo.clean)):
        summaries[name] = _cli(
            "site",
            "train",
            str(site),
            "--out",
            str(site.parent / f"{name}.pt"),
            "--epochs",
            "1",
            "--encoder",
            "resnet18",
            "--image-size",
            "64",
            "--val-fraction",
            "0",
            "--test-fraction",
            "0",
        )
    assert summaries["zoo"]["n_train"] == summaries["clean"]["n_train"] == clean_report["n_usable"]
    assert summaries["zoo"]["weights_hash"] == summaries["clean"]["weights_hash"]
    model = str(zoo.clean.parent / "clean.pt")
    evaluated = [
        EvaluationPayload.model_validate(
            _cli("site", "evaluate", str(site), "--model", model, "--role", "external")
        )
        for site in (zoo.root, zoo.clean)
    ]
    assert evaluated[0].n_used == clean_report["n_usable"]
    assert _payload_core(evaluated[0]) == _payload_core(evaluated[1])
