"""server.app: a wrong study config fails when the study starts, not after waiting for sites."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest

import server.app
from common.errors import SarcofedError
from protocols.study import StudyConfig, demo_run_config
from server.app import check_model_names, main, wait_for_sites


class NoSites:
    """A Grid that no site ever joins."""

    def get_node_ids(self) -> list[int]:
        return []


def test_model_names_are_checked_naming_the_run_config_key() -> None:
    close = r"invalid run config: model\.encoder: unknown encoder 'resnet35' \(close matches: .*resnet34"
    with pytest.raises(SarcofedError, match=close):
        check_model_names(StudyConfig.from_run_config({"model.encoder": "resnet35"}))
    with pytest.raises(SarcofedError, match=r"invalid run config: model\.arch: unknown model arch 'unte'"):
        check_model_names(StudyConfig.from_run_config({"model.arch": "unte"}))
    check_model_names(StudyConfig.from_run_config(demo_run_config()))  # what `flwr run .` runs
    check_model_names(StudyConfig())  # the seed's model


def test_waiting_for_sites_ends_when_the_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.app, "CONNECT_TIMEOUT_S", 30.0)
    failed: Future[None] = Future()
    failed.set_exception(SarcofedError("invalid run config: model.encoder: unknown encoder 'x'"))
    started = time.monotonic()
    with pytest.raises(SarcofedError, match=r"model\.encoder"):
        wait_for_sites(NoSites(), 2, abort=failed)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5
    passed: Future[None] = Future()
    passed.set_result(None)
    monkeypatch.setattr(server.app, "CONNECT_TIMEOUT_S", 0.5)
    with pytest.raises(SarcofedError, match=r"only 0 site\(s\) connected"):  # a passed check: wait on
        wait_for_sites(NoSites(), 2, abort=passed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ({"model.encoder": "resnet35"}, r"model\.encoder: unknown encoder 'resnet35'"),
        ({"model.image-size": 100}, r"model\.image-size: .*multiple of 32 .*got 100"),
    ],
)
def test_the_serverapp_fails_on_a_bad_model_without_waiting_for_sites(
    setting: dict[str, object], error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No site ever connects: a bad setting must stop the study before the connect timeout."""
    monkeypatch.setattr(server.app, "CONNECT_TIMEOUT_S", 30.0)
    run_config = demo_run_config() | {"study.output-dir": str(tmp_path)} | setting
    context = SimpleNamespace(run_id=7, run_config=run_config)
    started = time.monotonic()
    with pytest.raises((SarcofedError, ValueError), match=error):
        main(NoSites(), context)  # type: ignore[arg-type]
    assert time.monotonic() - started < 25
