"""The CLI is generated from the config dataclasses: every field has its flag and every flag
its field, child processes get their config back intact, and no error escapes as a traceback."""
import dataclasses

import pytest

from teegpu import cli
from teegpu.config import ApiConfig, EngineConfig, GenerationConfig, ServerConfig, from_args


def option_dests(parser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions if a.dest != "help"}


@pytest.mark.parametrize("command", sorted(cli.COMMAND_CONFIGS))
def test_every_field_has_a_flag_and_every_flag_a_field(command):
    fields = {f.name for cls in cli.COMMAND_CONFIGS[command] for f in dataclasses.fields(cls)}
    assert option_dests(cli.build_parser(), command) - cli.COMMAND_FLAGS[command] == fields


def test_defaults_come_from_the_dataclasses():
    args = cli.build_parser().parse_args(["generate", "hi"])
    assert from_args(EngineConfig, args) == EngineConfig() and from_args(GenerationConfig, args) == GenerationConfig()
    args = cli.build_parser().parse_args(["api"])
    assert from_args(ApiConfig, args) == ApiConfig()


def test_server_config_round_trips_through_argv():
    config = ServerConfig(model="/m.gguf", endpoint="ipc:///tmp/x.sock", device="cpu", dtype="bfloat16",
                          data_plane="socket", busy_poll_us=50, privacy="otp", parent_pid=123)
    args = cli.build_parser().parse_args(["serve", *config.to_argv()])
    assert from_args(ServerConfig, args) == config
    assert ServerConfig().to_argv() == []  # defaults are left to the child's own


def test_generation_flags_parse_into_the_config():
    args = cli.build_parser().parse_args(["generate", "hi", "--stop", "a", "--stop", "b", "--no-stop-at-eos",
                                          "--temperature", "0.5", "--logprobs", "3"])
    gen = from_args(GenerationConfig, args)
    assert gen.stop == ("a", "b") and not gen.stop_at_eos and gen.temperature == 0.5 and gen.logprobs == 3


def test_bad_value_is_one_line_naming_it(capsys):
    assert cli.main(["generate", "hi", "--top-p", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_p" in err


def test_unexpected_error_is_one_line_unless_debugging(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(cli.COMMANDS, "keys", boom)
    assert cli.main(["keys", "/tmp/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: disk on fire" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "keys", "/tmp/x"])
    monkeypatch.setenv("TEEGPU_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["keys", "/tmp/x"])
