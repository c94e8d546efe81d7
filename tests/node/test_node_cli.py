"""The command line on bad input: one line that says what is wrong, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio

from devnet import cli as devnet_cli
from node._errors import sole_error
from node.cli import main
from sharding import EMBEDDED_MODEL, Checkpoint, CheckpointError


def one_line(err: str) -> str:
    """The error output, checked to be a single line without a traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("flags", "says"), [
    (["--temperature", "-1"], "shardnet generate: temperature must be >= 0"),
    (["--top-p", "2"], "shardnet generate: top_p must be in (0, 1]"),
    (["--top-k", "-1"], "shardnet generate: top_k must be an int >= 0"),
])
@pytest.mark.parametrize("local", [False, True], ids=["network", "local"])
def test_bad_sampling_flags_are_refused_in_a_line(
    flags: list[str], says: str, local: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", *(["--local"] if local else []), *flags, "a prompt"]) == 2
    assert one_line(capsys.readouterr().err).startswith(says)


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--threads"])
def test_counts_below_one_are_refused_by_the_parser(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--local", flag, "0", "a prompt"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be 1 or more, got '0'" in capsys.readouterr().err


def test_a_folder_without_a_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--local", "--model", str(tmp_path), "a prompt"]) == 1
    assert one_line(capsys.readouterr().err) == f"shardnet generate: {tmp_path}: no config.json"
    assert main(["demo", "--model", str(tmp_path)]) == 1
    assert one_line(capsys.readouterr().err) == f"shardnet demo: {tmp_path}: no config.json"


def test_a_prompt_past_the_models_positions_is_one_line(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """The same words on the local path as through the network (the client's check)."""
    positions = Checkpoint.open(EMBEDDED_MODEL).config.max_position_embeddings
    prompt = "word " * positions
    assert main(["generate", "--local", "--max-new-tokens", "5", prompt]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("shardnet generate: prompt (")
    assert line.endswith(f"+ new tokens (5) exceeds the model's {positions} positions")
    assert main(["generate", "--local", ""]) == 1
    assert one_line(capsys.readouterr().err) == "shardnet generate: the prompt is empty"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--local", "--device", "cuda", "a prompt"]) == 1
    assert "this machine has no CUDA device" in one_line(capsys.readouterr().err)


def test_the_daemon_reports_errors_from_inside_its_nursery_in_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """These come out of `trio.run` as exception groups of one (they used to print as
    tracebacks); the bad flag values get past the parser and fail inside the daemon."""
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["node", "run", "--data-dir", str(tmp_path / "node"), "--no-mdns",
            "--listen", "/ip4/127.0.0.1/tcp/0"]
    for flags, says in ((["--model", str(empty)], f"{empty}: no config.json"),
                        (["--span", "5:2"], "span 5:2 is outside the model's stages"),
                        (["--device", "warp9"], "not a device: 'warp9'")):
        assert main([*base, *flags]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"shardnet node: {says}" in err.splitlines()[-1]


def test_the_devnet_command_reports_a_model_error_from_its_nursery_in_a_line(
    capsys: pytest.CaptureFixture[str]
) -> None:
    async def starts_and_fails() -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise CheckpointError("/models/x: no config.json")

    assert devnet_cli._run(starts_and_fails) == 1
    assert one_line(capsys.readouterr().err) == "devnet: error: /models/x: no config.json"


def test_a_devnet_folder_that_cannot_be_made_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["devnet", "up", "--nodes", "1", "--dir", str(a_file / "devnet")]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("devnet: error: [Errno 20] Not a directory")


def test_a_dead_bootstrap_is_one_line_in_a_terminal(
    tmp_path: Path, dead_bootstrap: str
) -> None:
    """In its own process: py-libp2p's failed dials would reach the terminal through logging's
    last-resort handler, which pytest's own log handlers hide in-process."""
    argv = ["generate", "--bootstrap", dead_bootstrap, "--route-timeout", "1", "a prompt"]
    done = subprocess.run(
        [sys.executable, "-c", f"from node.cli import main; raise SystemExit(main({argv!r}))"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 1
    assert done.stdout.strip() == ""
    assert one_line(done.stderr).endswith(f"(connected to no peer; bootstrap: {dead_bootstrap})")


def test_sole_error_unwraps_groups_of_one_only() -> None:
    leaf = ValueError("the one")
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [leaf])])
    assert sole_error(nested) is leaf
    assert sole_error(leaf) is leaf
    two = ExceptionGroup("two", [leaf, KeyError("another")])
    assert sole_error(two) is two
    assert sole_error(ExceptionGroup("outer", [two])) is two


def test_an_unexpected_error_still_shows_its_traceback() -> None:
    async def broken() -> int:
        async with trio.open_nursery():
            raise ZeroDivisionError("a bug, not bad input")

    with pytest.raises(ExceptionGroup) as info:
        devnet_cli._run(broken)
    assert isinstance(sole_error(info.value), ZeroDivisionError)
