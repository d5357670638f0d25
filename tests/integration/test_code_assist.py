"""Code-assist RPCs over a real gateway socket: the ChatLSP-shaped calls, UpdateFiles, TypeScript,
a completion on the real model, and bad inputs that must get clear status codes without harming the server.

Most tests run against a gateway whose operator made the test's temporary directories readable
(`code.allowed_roots`); the read-policy tests at the end use the default gateway, which reads no disk."""

from __future__ import annotations

import textwrap

import grpc
import pytest

from longbow.services.client.errors import LongbowError
from longbow.services.client.sdk import LongbowClient
from tests.rag.codectx.workspaces import MODELS, write_workspace

USE = """
    from app.models import User, Role
    def make(name: str) -> User: ...
    def f(name: str, role: Role) -> User:
        return <|>
    """


@pytest.fixture(scope="module")
def disk_gateway(loaded_model, tokenizer, tmp_path_factory):
    from longbow.services.config import CodeContextConfig
    from tests.conftest import RunningGateway

    code = CodeContextConfig(allowed_roots=[str(tmp_path_factory.getbasetemp())])
    running = RunningGateway(loaded_model, tokenizer, sections={"code": code})
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(disk_gateway):
    with LongbowClient(disk_gateway.address, timeout_s=600) as client:
        yield client


@pytest.fixture
def hole(tmp_path):
    return write_workspace(tmp_path, {"app/models.py": MODELS, "app/use.py": USE})


def _at(hole):
    return str(hole.root), hole.path, hole.line, hole.column


def test_whole_context_fits_the_budget_in_model_tokens(client, hole):
    found = client.code_context(*_at(hole), token_budget=200)
    assert (found.expected_type.text, found.expected_type.source) == ("User", "return")
    assert [d.name for d in found.type_definitions] == ["User", "Role", "Address"]
    assert found.headers[0].name == "make" and found.headers[0].path == "app/use.py" and found.headers[0].line == 2
    assert 0 < found.packed_tokens <= 200 and len(client.tokenize(found.packed_context)) <= 200
    assert found.packed_items[0].name == "User"


def test_chatlsp_calls(client, hole):
    assert client.expected_type(*_at(hole)).text == "User"
    assert client.relevant_types(*_at(hole))[0].text.startswith("@dataclass\nclass User")
    assert [h.name for h in client.relevant_headers(*_at(hole))] == ["make"]
    assert client.error_report(*_at(hole), fill="make(name)") == []
    [diagnostic] = client.error_report(*_at(hole), fill="role")
    assert diagnostic.line == hole.line and "Incompatible return value type" in diagnostic.message


def test_update_files_and_open_files(client, hole):
    root = str(hole.root)
    client.update_files(root, {"app/models.py": "class User:\n    nickname: str\n"})
    assert "nickname" in client.relevant_types(*_at(hole))[0].text
    client.update_files(root, {}, deleted=["app/models.py"])
    assert client.relevant_types(*_at(hole)) == []
    unsaved = {"app/use.py": "def g() -> int:\n    return \n"}
    assert client.expected_type(root, "app/use.py", 2, 12, open_files=unsaved).text == "int"


def test_typescript_context(client, tmp_path):
    ts_hole = write_workspace(tmp_path, {"web/app.ts": "interface Point { x: number }\nconst p: Point = <|>;\n"})
    found = client.code_context(*_at(ts_hole))
    assert found.expected_type.text == "Point" and found.type_definitions[0].name == "Point"


def test_completion_on_the_real_model(client, hole):
    completion = client.complete_hole(*_at(hole), max_tokens=4, error_rounds=1, token_budget=128)
    assert isinstance(completion.fill, str) and completion.rounds_used <= 1 and completion.context_tokens > 0
    assert completion.diagnostics == client.error_report(*_at(hole), fill=completion.fill)


@pytest.mark.parametrize("change,code", [
    ({"path": "app/missing.py"}, grpc.StatusCode.NOT_FOUND),
    ({"root": "/nonexistent/root"}, grpc.StatusCode.PERMISSION_DENIED),  # not readable: a sent workspace
    ({"line": 99}, grpc.StatusCode.OUT_OF_RANGE),
    ({"column": 500}, grpc.StatusCode.OUT_OF_RANGE),
    ({"path": "../outside.py"}, grpc.StatusCode.PERMISSION_DENIED),
    ({"path": "/etc/passwd"}, grpc.StatusCode.PERMISSION_DENIED),
    ({"root": "relative/root"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"path": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"path": "app/models.rb"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"token_budget": 10_000_000}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_inputs_get_clear_codes_and_the_server_keeps_serving(client, hole, change, code):
    root, path, line, column = _at(hole)
    with pytest.raises(LongbowError) as error:
        client.code_context(change.get("root", root), change.get("path", path), change.get("line", line),
                            change.get("column", column), token_budget=change.get("token_budget", 0))
    assert error.value.code == code and error.value.message
    assert client.expected_type(*_at(hole)).text == "User"


def test_symlink_out_of_the_root_is_refused(client, hole, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.py"
    outside.write_text("def f() -> int:\n    return \n")
    (hole.root / "app" / "link.py").symlink_to(outside)
    with pytest.raises(LongbowError) as error:
        client.code_context(str(hole.root), "app/link.py", 2, 12)
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED and "outside" in error.value.message


def test_service_is_listed_as_implemented(client):
    assert "longbow.v1.CodeAssist" in client.server_info().implemented_services


def test_async_client_calls(disk_gateway, hole):
    import asyncio

    from longbow.services.client.sdk import AsyncLongbowClient

    async def calls():
        async with AsyncLongbowClient(disk_gateway.address, timeout_s=120) as client:
            found = await client.code_context(*_at(hole), token_budget=300)
            headers = await client.relevant_headers(*_at(hole))
            count = await client.update_files(str(hole.root), {"app/extra.py": "class Extra: ...\n"})
            return found, headers, count

    found, headers, count = asyncio.run(calls())
    assert found.expected_type.text == "User" and found.packed_tokens <= 300
    assert [h.name for h in headers] == ["make"] and count > 0


# The default gateway (no code.allowed_roots) reads no disk: the reproductions of issue 16 are refused.

@pytest.fixture(scope="module")
def default_client(gateway):
    with LongbowClient(gateway.address, timeout_s=600) as client:
        yield client


def test_default_gateway_refuses_to_read_the_servers_files(default_client, tmp_path):
    (tmp_path / "settings.py").write_text("class Settings:\n    password: str = 'hunter2'\nx: Settings = \n")
    calls = [
        lambda: default_client.code_context("/", str(tmp_path / "settings.py"), 3, 14),
        lambda: default_client.code_context(str(tmp_path), "settings.py", 3, 14),
        lambda: default_client.complete_hole("/etc", "passwd", 1, 1, language="python", max_tokens=1),
        lambda: default_client.error_report("/etc", "passwd", 1, 1, fill="x", language="python"),
    ]
    for call in calls:
        with pytest.raises(LongbowError) as error:
            call()
        assert error.value.code == grpc.StatusCode.PERMISSION_DENIED and "LONGBOW_CODE_ROOTS" in error.value.message


def test_sent_workspace_end_to_end_without_disk(default_client):
    root = "/longbow-test/not-on-this-disk"  # the client's root: a name the server never looks up
    use = textwrap.dedent(USE).lstrip("\n")
    line = use.split("\n").index("    return <|>") + 1
    assert default_client.update_files(root, {"app/models.py": MODELS, "app/use.py": use.replace("<|>", "")}) > 0
    found = default_client.code_context(root, "app/use.py", line, 12, token_budget=200)
    assert found.expected_type.text == "User" and [d.name for d in found.type_definitions] == ["User", "Role", "Address"]
    completion = default_client.complete_hole(root, "app/use.py", line, 12, max_tokens=2, error_rounds=0)
    assert isinstance(completion.fill, str) and completion.context_tokens > 0


def test_cli_context_through_a_gateway_that_reads_no_disk(gateway, hole, capsys):
    """`longbow context --address` sends the hole's file and what it imports (the server reads no disk):
    the same definitions as the embedded command, which reads the files itself."""
    from longbow.services.cli import main

    location = f"{hole.root / hole.path}:{hole.line}:{hole.column}"
    assert main(["context", location, "--root", str(hole.root), "--budget", "200"]) == 0
    embedded = capsys.readouterr()
    assert main(["context", location, "--root", str(hole.root), "--budget", "200", "--address", gateway.address]) == 0
    remote = capsys.readouterr()
    assert "expected type: User" in remote.err and "class User" in remote.out
    # The gateway counts the budget with the model's tokenizer, the embedded command with a character
    # estimate (packing.approximate_tokens), so the two may keep different in-scope lines.
    assert embedded.out.split("# app/use.py")[0] == remote.out.split("# app/use.py")[0]
    assert set(remote.out.splitlines()) <= set(embedded.out.splitlines())
