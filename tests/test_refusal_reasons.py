"""Attack: learn where a site keeps its data from its error replies.

A coordinator (or anyone reading the study record) sees every refusal and failure reason
a site sends. Driven through the real ClientApp handler, a site in each broken state below
must say what is wrong (a person can act on it) without naming the site folder's path, the
folder above it, the machine's home folders, or any file name or patient key of its
manifest. Every secret here holds "QZX" or "CANARY", so one case-insensitive search finds
any of them, whatever form (resolved, relative, escaped) it leaks in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from clientapp_messages import handle, payload_json
from fixtures_site import make_site, write_manifest
from flwr.app import Message

from client.audit import audit_path
from common.paths import HOME_ENV
from protocols import keys

SECRETS = ("qzx", "canary")


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _site(tmp_path: Path, folder: str = "QZX-folder") -> Path:
    """A valid site whose path, folder name, file names and patient keys are all secrets."""
    root = make_site(tmp_path / "CANARY-parent", n=6, size=32, name=folder, with_reference=True)
    (root / "site.toml").write_text(
        (root / "site.toml").read_text(encoding="utf-8").replace(f'"{folder}"', '"hospital-a"'),
        encoding="utf-8",
    )
    rows = []
    for i in range(6):
        names = {
            "image": f"ct/QZX-PATIENT-00{i}.dcm",
            "label": f"labels/QZX-MASK-00{i}.png",
            "reference": f"references/QZX-REF-00{i}.npy",
        }
        for column, old in (("image", "ct/slice_{}.dcm"), ("label", "labels/slice_{}.png")):
            (root / old.format(i)).rename(root / names[column])
        (root / f"references/slice_{i}.npy").rename(root / names["reference"])
        rows.append(names | {"group": f"QZX-GROUP-{i}", "height_m": "1.70", "sex": "F"})
    write_manifest(root, rows)
    return root


def _rewrite(name: str, text: str | bytes) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        (root / name).write_bytes(data)

    return change


def _remove(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).unlink()


def _make_folder(name: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        (root / name).unlink(missing_ok=True)
        (root / name).mkdir()

    return change


def _manifest_row(row: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        with (root / "manifest.csv").open("a", encoding="utf-8") as fh:
            fh.write(row + "\n")

    return change


def _images(action: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        for image in sorted((root / "ct").iterdir()):
            if action == "garbage":
                image.write_bytes(b"QZX-not-a-dicom")
            else:  # a folder where the image should be: an OSError, not a SliceError
                image.unlink()
                image.mkdir()

    return change


#: state -> (how to break a valid site, words the reason must hold so a person can act).
BROKEN: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "policy.toml unparsable": (
        _rewrite("policy.toml", "min-slices = = 3\n"),
        ("policy.toml", "release policy"),
    ),
    "policy.toml with a bad key": (_rewrite("policy.toml", "min-slice = 3\n"), ("policy.toml", "min-slice")),
    "policy.toml not UTF-8": (_rewrite("policy.toml", b"\xff\xfe min"), ("policy.toml", "utf-8")),
    "policy.toml is a folder": (_make_folder("policy.toml"), ("policy.toml",)),
    "site.toml not TOML": (_rewrite("site.toml", "name = \n"), ("site.toml", "not valid toml")),
    "site.toml missing": (_remove("site.toml"), ("site.toml is missing",)),
    "site.toml labels incomplete": (
        _rewrite("site.toml", 'name = "hospital-a"\n[labels]\nmuscle = [1]\n'),
        ("site.toml", "labels.visceral_fat"),
    ),
    "manifest.csv missing": (_remove("manifest.csv"), ("manifest.csv is missing",)),
    "manifest.csv without an image column": (
        _rewrite("manifest.csv", "picture,label\nct/QZX-PATIENT-000.dcm,labels/QZX-MASK-000.png\n"),
        ("manifest.csv", "image"),
    ),
    "manifest.csv not UTF-8": (_rewrite("manifest.csv", b"\xff\xfeQZX"), ("manifest.csv", "utf-8")),
    "manifest.csv with bad rows": (
        _manifest_row(",labels/QZX-MASK-009.png,QZX-GROUP-9,abc,X,/CANARY-pacs/QZX-REF-009.npy"),
        (),
    ),
    "manifest.csv naming files outside the site": (
        _manifest_row("/CANARY-pacs/QZX-PATIENT-010.dcm,../../QZX-MASK-010.png,QZX-GROUP-10,1.7,M,"),
        (),
    ),
    "images unreadable": (_images("garbage"), ("usable slice",)),
    "images are folders": (_images("folder"), ()),
    "audit log cannot be written": (
        lambda root: audit_path(root).mkdir(),
        ("audit",),
    ),
}


def _reasons(node_config: dict[str, object]) -> list[tuple[str, Message]]:
    return [(task, handle(task, node_config)) for task in ("identify", "compare")]


def _assert_leak_free(replies: list[tuple[str, Message]], forbidden: list[str]) -> None:
    for task, reply in replies:
        if reply.has_error():
            text = reply.error.reason or ""
        else:  # a reply that was released: screened by the guard, checked here all the same
            text = payload_json(reply)
        for secret in (*SECRETS, *(f.lower() for f in forbidden)):
            assert secret not in text.lower(), f"{task}: {secret!r} in {text!r}"


def _forbidden(root: Path) -> list[str]:
    parent = root.parent
    home = Path.home()
    # a home of "/" (HOME=/ in some containers) is in every path-like text: not a secret then
    homes = [str(home)] if len(home.parts) > 1 else []
    return [str(root), str(root.resolve()), str(parent), str(parent.resolve()), root.name, *homes]


@pytest.mark.parametrize("state", sorted(BROKEN))
def test_a_broken_site_says_what_is_wrong_without_its_paths_or_file_names(tmp_path: Path, state: str) -> None:
    root = _site(tmp_path)
    assert not handle("compare", {"site-dir": str(root)}).has_error()  # valid before it is broken
    audit_path(root).unlink()
    for path in root.parent.glob("QZX-folder.audit.*"):
        path.unlink()
    breaks, words = BROKEN[state]
    breaks(root)
    replies = _reasons({"site-dir": str(root)})
    _assert_leak_free(replies, [*_forbidden(root), str(tmp_path)])
    errors = [reply.error.reason or "" for _, reply in replies if reply.has_error()]
    for word in words:
        assert errors and all(word in reason.lower() for reason in errors), (word, errors)


@pytest.mark.parametrize("how", ["symlink", "home", "relative", "odd characters"])
def test_the_site_path_does_not_leak_however_site_dir_is_written(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same site, named through a symlink, from $HOME, relative to the working folder,
    or in a folder whose name repr() escapes: the path leaks in none of its forms."""
    root = _site(tmp_path, folder="QZX-o'brien\\folder" if how == "odd characters" else "QZX-folder")
    (root / "policy.toml").mkdir()  # an OSError: its message holds the path as repr() writes it
    (root / "site.toml").write_text("name = \n", encoding="utf-8")
    site_dir = str(root)
    forbidden = [*_forbidden(root), str(tmp_path), repr(str(root))[1:-1]]
    if how == "symlink":
        link = tmp_path / "CANARY-link"
        link.symlink_to(root)
        site_dir = str(link)
        forbidden.append(str(link))
    elif how == "home":
        monkeypatch.setenv("HOME", str(root.parent))
        site_dir = f"~/{root.name}"
    elif how == "relative":
        monkeypatch.chdir(root.parent)
        site_dir = root.name
    replies = _reasons({"site-dir": site_dir})
    assert all(reply.has_error() for _, reply in replies)
    _assert_leak_free(replies, forbidden)
    assert all("policy.toml" in (reply.error.reason or "") for _, reply in replies)
    (root / "policy.toml").rmdir()  # the next failure: site.toml, read after the policy
    replies = _reasons({"site-dir": site_dir})
    _assert_leak_free(replies, forbidden)
    assert all("site.toml" in (reply.error.reason or "") for _, reply in replies)


def test_a_missing_or_mistyped_site_folder_says_so(tmp_path: Path) -> None:
    parent = tmp_path / "CANARY-parent"
    parent.mkdir()
    for site_dir in (parent / "QZX-missing", parent / "CANARY-nowhere" / "QZX-missing"):
        replies = _reasons({"site-dir": str(site_dir)})
        _assert_leak_free(replies, [str(site_dir), str(parent), str(tmp_path)])
        for _, reply in replies:
            assert reply.has_error() and "does not exist" in (reply.error.reason or "")
    (parent / "QZX-file").write_text("not a folder", encoding="utf-8")
    replies = _reasons({"site-dir": str(parent / "QZX-file")})
    _assert_leak_free(replies, [str(parent), str(tmp_path)])
    assert all("is a file" in (reply.error.reason or "") for _, reply in replies)


def test_a_missing_simulated_site_names_sarcofed_home_not_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "CANARY-home"
    monkeypatch.setenv(HOME_ENV, str(home))
    replies = _reasons({"partition-id": 1, "num-partitions": 2})
    _assert_leak_free(replies, [str(home), str(tmp_path)])
    for _, reply in replies:
        reason = reply.error.reason or ""
        assert f"${HOME_ENV}{os.sep}demo-sites{os.sep}site-1" in reason
        assert "sarcofed study demo --make-only" in reason


def test_a_node_without_a_site_folder_says_how_to_give_one() -> None:
    for _, reply in _reasons({}):
        assert reply.has_error() and "--node-config 'site-dir=" in (reply.error.reason or "")


def test_a_crash_deep_in_the_code_leaves_as_its_kind_and_no_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library's exception may name any file of the machine: a cache, a temporary copy, the
    site's own files through another spelling. None of it leaves; the kind of error does."""
    from client import site_tasks

    root = _site(tmp_path)
    elsewhere = "/var/CANARY-cache/QZX-scratch/weights.bin"

    def crash(*_: object, **__: object) -> None:
        raise OSError(
            f"[Errno 5] Input/output error: {elsewhere!r} while reading {root}/ct/QZX-PATIENT-001.dcm "
            f"(cwd {root.parent}, home {Path.home()}/.cache)"
        )

    monkeypatch.setattr(site_tasks, "run_compare", crash)
    reply = handle("compare", {"site-dir": str(root)})
    assert reply.has_error() and reply.error.code == keys.ERROR_FAILED
    _assert_leak_free([("compare", reply)], [*_forbidden(root), str(tmp_path), "/var/"])
    reason = reply.error.reason or ""
    assert (
        reason.startswith("OSError: [Errno 5] Input/output error") and "while reading <site>/<file>" in reason
    )


def test_redaction_leaves_what_is_not_a_path_alone(tmp_path: Path) -> None:
    from client.redact import redact

    text = "HU/mm ratio 1/2 (mean/sd); see https://errors.pydantic.dev/2.11/v/missing; ~/.cache/x; <site>/ct"
    assert redact(text, tmp_path / "site", ()) == text
    assert redact("C:\\QZX\\site\\x.dcm and /QZX/a/b", None, ()) == "<path> and <path>"
