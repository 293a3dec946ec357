import pytest

from engine.config import Config
from engine.errors import InvalidRequest


def test_flags_beat_environment_beat_defaults() -> None:
    env = {"ENGINE_HTTP_PORT": "9000", "ENGINE_MAX_BATCH_SIZE": "4"}
    cfg = Config.build({"http_port": 9100, "max_batch_size": None}, env)
    assert cfg.http_port == 9100
    assert cfg.max_batch_size == 4
    assert cfg.grpc_port == 50051


def test_bad_environment_value_is_named() -> None:
    with pytest.raises(InvalidRequest, match="ENGINE_MAX_BATCH_SIZE='many'"):
        Config.build({}, {"ENGINE_MAX_BATCH_SIZE": "many"})


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(InvalidRequest, match="max_batch_size must be at least 1"):
        Config.build({"max_batch_size": 0}, {})
    with pytest.raises(InvalidRequest, match="device must be"):
        Config.build({"device": "tpu"}, {})
    with pytest.raises(InvalidRequest, match="greedy_lane must be auto, continuous or batch, got 'fast'"):
        Config.build({}, {"ENGINE_GREEDY_LANE": "fast"})


def test_serve_help_lists_the_settings_that_have_no_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import fields

    from engine.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert "ENGINE_<NAME>" in text
    for name in ("cuda_graphs", "qlinear", "batch_scheduling", "auth_disabled"):
        assert f"ENGINE_{name.upper()} (default" in text
    # A setting with a flag is not repeated there.
    assert "ENGINE_HTTP_PORT (default" not in text
    assert {f.name for f in fields(Config)} >= {"cuda_graphs", "qlinear"}
