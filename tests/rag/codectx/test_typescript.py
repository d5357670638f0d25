"""TypeScript context through the real Node helper and the TypeScript compiler."""

from __future__ import annotations

import pytest

from longbow.rag.codectx.errors import CheckerUnavailableError, PositionError
from longbow.rag.codectx.service import CodeContextService, HoleRequest

MODELS_TS = """
    export enum Role { Admin = "admin", Member = "member" }
    export interface Address { street: string; resident?: User }
    export interface User { name: string; role: Role; address: Address | null }
    export type Json = string | number | Json[] | { [key: string]: Json };
    export type Users = User[];
    export class Repo {
      private users: Users = [];
      find(name: string): User | undefined { return this.users.find((u) => u.name === name); }
      first(): User { return this.users[0]; }
    }
"""


@pytest.fixture(scope="module")
def service(disk_roots):
    service = CodeContextService(readable_roots=disk_roots)
    yield service
    service.close()


def _context(service, hole):
    return service.context(HoleRequest(str(hole.root), hole.path, hole.line, hole.column, token_budget=1024))


@pytest.mark.parametrize("code,expected,source", [
    ("export function f(): User {\n  return <|>\n}\n", "User", "return"),
    ("const u: Address = <|>;\n", "Address", "annotated_assignment"),
    ("function take(r: Role, n: number) {}\ntake(Role.Admin, <|>);\n", "number", "call_argument"),
    ("function g(u: User) { return u.role === <|> }\n", "Role", "comparison"),
    ("function g(n: number) { return n * <|> }\n", "number", "operator"),
])
def test_expected_type_rules(service, workspace, code, expected, source):
    hole = workspace({"src/models.ts": MODELS_TS, "src/app.ts": 'import { User, Role, Address } from "./models";\n' + code})
    found = _context(service, hole).expected_type
    assert (found.text, found.source) == (expected, source)


def test_closure_headers_and_bindings(service, workspace):
    hole = workspace({"src/models.ts": MODELS_TS, "src/app.ts": """
        import { User, Role, Repo } from "./models";
        export function makeUser(name: string): User { return { name, role: Role.Member, address: null }; }
        export const factory = (): ((n: string) => User) => makeUser;
        export function count(): number { return 1; }
        export function admin(repo: Repo, name: string): User {
          return <|>
        }
        """})
    found = _context(service, hole)
    assert [d.name for d in found.type_definitions][:4] == ["User", "Repo", "Role", "Address"]
    assert [(h.name, h.detail) for h in found.headers] == [
        ("makeUser", "exact"), ("first", "exact"), ("factory", "codomain:1"), ("find", "wider")]
    types = {b.name: b.detail for b in found.bindings}
    assert types["repo"] == "Repo" and types["name"] == "string" and types["User"] == "type User"
    assert found.packed_text.startswith("// expected type of the hole: User\n// src/models.ts:")


def test_recursive_alias_terminates(service, workspace):
    hole = workspace({"src/models.ts": MODELS_TS, "src/j.ts": 'import { Json } from "./models";\nconst j: Json = <|>;\n'})
    assert [d.name for d in _context(service, hole).type_definitions] == ["Json"]


def test_incremental_change_is_seen(service, workspace, tmp_path):
    hole = workspace({"src/t.ts": "export interface Point { x: number }\nconst p: Point = <|>;\n"})
    assert "x: number" in _context(service, hole).type_definitions[0].text
    (tmp_path / "src" / "t.ts").write_text("export interface Point { y: string }\nconst p: Point = ;\n")
    import os
    stat = (tmp_path / "src" / "t.ts").stat()
    os.utime(tmp_path / "src" / "t.ts", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    assert "y: string" in _context(service, hole).type_definitions[0].text


def test_check_reports_type_errors_on_the_fill_line(service, workspace):
    hole = workspace({"src/c.ts": "function f(): number {\n  return <|>;\n}\nconst broken: string = 1;\n"})
    request = HoleRequest(str(hole.root), hole.path, hole.line, hole.column)
    assert service.check(request, "42") == []
    diagnostics = service.check(request, '"text"')
    assert len(diagnostics) == 1 and "not assignable to type 'number'" in diagnostics[0].message
    assert diagnostics[0].line == 2


def test_helper_restarts_after_it_dies(service, workspace):
    hole = workspace({"src/r.ts": "const n: number = <|>;\n"})
    assert _context(service, hole).expected_type.text == "number"
    helper = service.typescript()
    starts = helper.starts
    helper._process.kill()
    helper._process.wait()
    assert _context(service, hole).expected_type.text == "number"  # a dead helper is replaced before sending
    assert helper.starts == starts + 1


def test_helper_that_cannot_start_is_a_clear_error(workspace):
    from longbow.rag.codectx.typescript import TypeScriptHelper

    with pytest.raises(CheckerUnavailableError):
        TypeScriptHelper(node="/nonexistent/node").call("ping")


def test_position_outside_file(service, workspace):
    hole = workspace({"src/p.ts": "const n: number = <|>;\n"})
    with pytest.raises(PositionError):
        service.context(HoleRequest(str(hole.root), hole.path, 9, 1))
