"""docker-compose.yml and the Dockerfile, checked without Docker.

The compose file is JSON-compatible YAML (comment lines, then one JSON object), so the
standard library reads it; Docker reads it as YAML. Its commands must be exactly what the
process devnet runs, i.e. what ``node_command`` builds with ``python -m node`` as the program.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest

from devnet import node_command

ROOT = Path(__file__).resolve().parents[2]
DEVNET = ROOT / "devnet"
PROGRAM = ("python", "-m", "node")
LISTEN = "/ip4/0.0.0.0/tcp/4001"
# The peer id of devnet/compose/bootstrap-identity.key (a devnet-only key).
COMPOSE_BOOTSTRAP_ID = "12D3KooWGPrXKLvQdUdpwMLfKe33tAeiWcfWND2cHT7EXQoA7Tcb"


def load_compose() -> dict[str, Any]:
    text = (DEVNET / "docker-compose.yml").read_text()
    body = "".join(line for line in text.splitlines(keepends=True)
                   if not line.lstrip().startswith("#"))
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = (DEVNET / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [(line.split()[0].upper(), line.split(maxsplit=1)[1]) for line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def test_services_run_the_process_devnet_commands() -> None:
    services = load_compose()["services"]
    assert sorted(services) == ["bootstrap", "node-0", "node-1", "node-2"]
    assert services["bootstrap"]["command"] == node_command(
        role="bootstrap", data_dir=Path("/bootstrap-data"), listen=LISTEN, program=PROGRAM)
    for name in ("node-0", "node-1", "node-2"):
        service = services[name]
        assert service["command"] == node_command(
            role="node", data_dir=Path("/data"), listen=LISTEN,
            bootstrap=[f"/dns4/bootstrap/tcp/4001/p2p/{COMPOSE_BOOTSTRAP_ID}"], program=PROGRAM)
        assert service["depends_on"] == {"bootstrap": {"condition": "service_healthy"}}
    for service in services.values():
        command = service["command"]
        # The node package's entry point and one of its subcommands, run by `python -m`.
        assert command[:3] == list(PROGRAM) and command[3] in ("run", "bootstrap")
        assert service["build"] == {"context": "..", "dockerfile": "devnet/Dockerfile"}
        assert service["networks"] == ["devnet"]
        data_dir = service["command"][service["command"].index("--data-dir") + 1]
        assert f"{data_dir}/status.json" in " ".join(service["healthcheck"]["test"])


def test_the_bootstrap_key_file_is_the_identity_nodes_dial() -> None:
    from p2p import Identity

    key = DEVNET / "compose" / "bootstrap-identity.key"
    assert key.is_file()
    assert "install -m 600 devnet/compose/bootstrap-identity.key /bootstrap-data/" in \
        (DEVNET / "Dockerfile").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(key, Path(tmp) / "identity.key")
        (Path(tmp) / "identity.key").chmod(0o600)  # as the Dockerfile installs it
        assert Identity.load_or_create(tmp).peer_id_str == COMPOSE_BOOTSTRAP_ID


def test_every_service_keeps_its_identity_in_its_own_volume() -> None:
    compose = load_compose()
    volumes = [v for s in compose["services"].values() for v in s["volumes"]]
    assert all(v.endswith((":/data", ":/bootstrap-data")) for v in volumes)
    names = [v.split(":")[0] for v in volumes]
    assert len(set(names)) == len(names) and set(names) == set(compose["volumes"])


def _pip_install(command: str) -> list[str] | None:
    """``pip install`` arguments of a shell command, venv prefixes and quiet flags dropped."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if Path(word).name in ("pip", "pip3") and words[i + 1] == "install":
            return [w for w in words[i + 2:] if w not in ("-q", "--quiet")]
    return None


def test_dockerfile_installs_with_the_readme_command_and_the_project_pin() -> None:
    runs = [arg for op, arg in dockerfile_instructions() if op == "RUN"]
    installs = [args for args in map(_pip_install, runs) if args is not None]
    assert installs == [["-e", "."]]
    readmes = [p for p in (ROOT / "README.md", DEVNET / "README.md") if p.exists()]
    documented = [_pip_install(line) for p in readmes for line in p.read_text().splitlines()
                  if "pip install" in line]
    assert installs[0] in documented
    # torch only through the project's pin: no second, different torch in the image.
    assert not any(re.search(r"\btorch\b", run) for run in runs)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]


def test_dockerfile_copies_every_package_it_installs() -> None:
    copied = {arg.split()[0] for op, arg in dockerfile_instructions() if op == "COPY"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert top_level <= copied
    froms = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    assert froms and froms[0].startswith("python:3.11")


@pytest.mark.parametrize("command", ["pip install -e .", ".venv/bin/pip install -q -e .",
                                     "python3 -m venv .venv && .venv/bin/pip install -e ."])
def test_pip_install_is_recognised(command: str) -> None:
    assert _pip_install(command) == ["-e", "."]
