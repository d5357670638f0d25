// Typed-hole context and type checks for TypeScript, through the TypeScript compiler API.
//
// A long-lived process: one JSON request per stdin line, one JSON reply per stdout line
// ({id, ok, result} or {id, ok: false, error}). The Python side (rag/codectx/typescript.py) owns path
// safety: it sends the workspace root, the files to load (relative paths with a version each) and the
// overlays (open files, and the hole's file with the sentinel already in place). This process keeps one
// LanguageService per root so a changed file re-checks incrementally. It enforces the same rule itself:
// a path is read only if its real path (symlinks resolved) lies under the root's real path or TypeScript's
// lib, never above max_file_bytes; with disk: false (a workspace the client sent) nothing but the lib is
// read, and directories exist only where sent files are.
"use strict";

const fs = require("fs");
const path = require("path");
const readline = require("readline");
const ts = require("typescript");

const SENTINEL = "__longbow_hole__";
const MAX_CLOSURE = 64;
const MAX_HEADERS = 8;
const MAX_BINDINGS = 80;
const MAX_DECLARATION_LINES = 40;
const LIB_DIRECTORY = fs.realpathSync(path.dirname(ts.getDefaultLibFilePath({})));
const OPTIONS = {
  strict: true, target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext,
  moduleResolution: ts.ModuleResolutionKind.Bundler, noEmit: true, skipLibCheck: true, allowJs: false,
};
const workspaces = new Map(); // root -> {files: Map(absolute -> {version, text?}), service}

function workspaceFor(root, disk) {
  const key = (disk ? "disk:" : "sent:") + root;
  let state = workspaces.get(key);
  if (!state) {
    const files = new Map();
    const realRoot = disk ? realPath(root) : null;
    const readable = (file) => {
      const real = realPath(file);
      return real !== null && (under(LIB_DIRECTORY, real) || (realRoot !== null && under(realRoot, real)));
    };
    const sentDirectory = (directory) => {
      const prefix = directory.endsWith(path.sep) ? directory : directory + path.sep;
      for (const file of files.keys()) if (file.startsWith(prefix)) return true;
      return false;
    };
    state = {files, maxFileBytes: 1000000};
    const host = {
      getScriptFileNames: () => [...files.keys()],
      getScriptVersion: (file) => (files.get(file) || {version: "0"}).version,
      getScriptSnapshot: (file) => {
        const text = readText(state, file, readable);
        return text === undefined ? undefined : ts.ScriptSnapshot.fromString(text);
      },
      getCurrentDirectory: () => root,
      getCompilationSettings: () => OPTIONS,
      getDefaultLibFileName: (options) => ts.getDefaultLibFilePath(options),
      fileExists: (file) => files.has(file) || (readable(file) && isFile(file)),
      readFile: (file) => readText(state, file, readable),
      readDirectory: () => [],
      directoryExists: (directory) => sentDirectory(directory) || readable(directory),
      getDirectories: () => [],
    };
    state.service = ts.createLanguageService(host, ts.createDocumentRegistry());
    workspaces.set(key, state);
  }
  return state;
}

function realPath(file) {
  try {
    return fs.realpathSync.native(file);
  } catch (error) {
    return null; // missing (or unreadable): neither exists nor may be read
  }
}

function under(directory, real) {
  return real === directory || real.startsWith(directory + path.sep);
}

function isFile(file) {
  try {
    return fs.statSync(file).isFile();
  } catch (error) {
    return false;
  }
}

function readText(state, file, readable) {
  const entry = state.files.get(file);
  if (entry && entry.text !== undefined) return entry.text;
  if (!readable(file)) return undefined;
  try {
    if (fs.statSync(file).size > state.maxFileBytes) return undefined;
    const text = fs.readFileSync(file, "utf8");
    if (entry) entry.text = text;
    return text;
  } catch (error) {
    return undefined;
  }
}

// Bring the file set up to date: disk files by version (their text is re-read lazily), overlays by text.
function sync(request) {
  const state = workspaceFor(request.root, request.disk === true);
  if (request.max_file_bytes) state.maxFileBytes = request.max_file_bytes;
  const wanted = new Map();
  for (const [relative, version] of request.files) wanted.set(path.join(request.root, relative), {version});
  for (const [relative, text] of Object.entries(request.overlays || {})) {
    wanted.set(path.join(request.root, relative), {version: "overlay:" + hashText(text), text});
  }
  for (const file of [...state.files.keys()]) if (!wanted.has(file)) state.files.delete(file);
  for (const [file, entry] of wanted) {
    const old = state.files.get(file);
    if (!old || old.version !== entry.version) state.files.set(file, entry);
  }
  return state;
}

function hashText(text) {
  let hash = 0;
  for (let i = 0; i < text.length; i++) hash = (hash * 31 + text.charCodeAt(i)) | 0;
  return hash + ":" + text.length;
}

function findHole(sourceFile, offset) {
  let found;
  const visit = (node) => {
    if (found) return;
    if (ts.isIdentifier(node) && node.text === SENTINEL && node.getStart(sourceFile) <= offset + 1) found = node;
    else ts.forEachChild(node, visit);
  };
  visit(sourceFile);
  return found;
}

const COMPARISONS = new Set([
  ts.SyntaxKind.EqualsEqualsEqualsToken, ts.SyntaxKind.ExclamationEqualsEqualsToken, ts.SyntaxKind.EqualsEqualsToken,
  ts.SyntaxKind.ExclamationEqualsToken, ts.SyntaxKind.LessThanToken, ts.SyntaxKind.GreaterThanToken,
  ts.SyntaxKind.LessThanEqualsToken, ts.SyntaxKind.GreaterThanEqualsToken]);
const OPERATORS = new Set([
  ts.SyntaxKind.PlusToken, ts.SyntaxKind.MinusToken, ts.SyntaxKind.AsteriskToken, ts.SyntaxKind.SlashToken,
  ts.SyntaxKind.PercentToken]);

// The hole's expected type: the other operand of a comparison/operator, else the contextual type.
function expectedType(checker, hole) {
  let expression = hole;
  if (ts.isPropertyAccessExpression(hole.parent) && hole.parent.name === hole) expression = hole.parent;
  const parent = expression.parent;
  if (ts.isBinaryExpression(parent)) {
    const kind = parent.operatorToken.kind;
    if (COMPARISONS.has(kind) || OPERATORS.has(kind)) {
      const other = parent.left === expression ? parent.right : parent.left;
      return {type: checker.getTypeAtLocation(other), source: COMPARISONS.has(kind) ? "comparison" : "operator"};
    }
  }
  const type = checker.getContextualType(expression);
  return {type, source: type ? sourceOf(parent) : ""};
}

function sourceOf(parent) {
  if (ts.isReturnStatement(parent) || ts.isArrowFunction(parent)) return "return";
  if (ts.isVariableDeclaration(parent)) return parent.type ? "annotated_assignment" : "declaration";
  if (ts.isCallExpression(parent) || ts.isNewExpression(parent)) return "call_argument";
  if (ts.isParameter(parent)) return "default";
  if (ts.isPropertyAssignment(parent)) return "property";
  if (ts.isBinaryExpression(parent)) return "declaration";
  return "contextual";
}

function render(checker, type) {
  return type ? checker.typeToString(type, undefined, ts.TypeFormatFlags.NoTruncation) : "";
}

function inWorkspace(root, declaration) {
  const file = declaration.getSourceFile().fileName;
  return file.startsWith(root + path.sep) && !file.includes(path.sep + "node_modules" + path.sep);
}

function location(root, node) {
  const sourceFile = node.getSourceFile();
  const {line} = sourceFile.getLineAndCharacterOfPosition(node.getStart(sourceFile));
  return {path: path.relative(root, sourceFile.fileName).split(path.sep).join("/"), line: line + 1};
}

const TYPE_DECLARATIONS = new Set([ts.SyntaxKind.InterfaceDeclaration, ts.SyntaxKind.TypeAliasDeclaration,
  ts.SyntaxKind.ClassDeclaration, ts.SyntaxKind.EnumDeclaration]);

// Symbols a type is built from (its alias, its own symbol, union members, type arguments); each type
// visited once, so recursive aliases (type Json = ... | Json[]) terminate.
function symbolsOfType(checker, type, into, seen = new Set()) {
  if (!type || seen.has(type)) return into;
  seen.add(type);
  if (type.aliasSymbol) into.push(type.aliasSymbol);
  if (type.symbol) into.push(type.symbol);
  if (type.isUnionOrIntersection()) for (const member of type.types) symbolsOfType(checker, member, into, seen);
  if (type.flags & ts.TypeFlags.Object && type.objectFlags & ts.ObjectFlags.Reference) {
    for (const argument of checker.getTypeArguments(type)) symbolsOfType(checker, argument, into, seen);
  }
  for (const argument of type.aliasTypeArguments || []) symbolsOfType(checker, argument, into, seen);
  return into;
}

function typeDeclarations(checker, symbol) {
  if (symbol.flags & ts.SymbolFlags.Alias) symbol = checker.getAliasedSymbol(symbol);
  return (symbol.declarations || []).filter((d) => TYPE_DECLARATIONS.has(d.kind));
}

// Breadth-first, cycle-safe closure of type declarations from the seed symbols, workspace files only.
function typeClosure(checker, root, seeds) {
  const queue = [...seeds];
  const seen = new Set();
  const closure = [];
  while (queue.length && closure.length < MAX_CLOSURE) {
    const symbol = queue.shift();
    for (const declaration of typeDeclarations(checker, symbol)) {
      if (seen.has(declaration) || !inWorkspace(root, declaration)) continue;
      seen.add(declaration);
      closure.push(declaration);
      const visit = (node) => {
        if (ts.isTypeReferenceNode(node) || ts.isExpressionWithTypeArguments(node)) {
          const target = checker.getSymbolAtLocation(ts.isTypeReferenceNode(node) ? node.typeName : node.expression);
          if (target) queue.push(target);
        }
        ts.forEachChild(node, visit);
      };
      ts.forEachChild(declaration, visit);
    }
  }
  return closure;
}

function declarationText(declaration) {
  const sourceFile = declaration.getSourceFile();
  let text;
  if (ts.isClassDeclaration(declaration)) {
    const header = sourceFile.text.slice(declaration.getStart(sourceFile), declaration.members.pos).trimEnd();
    const members = declaration.members.map((m) => "  " + signatureText(m).replace(/\n\s*/g, " "));
    text = [header, ...members, "}"].join("\n");
  } else {
    text = declaration.getText(sourceFile);
  }
  const lines = text.split("\n");
  return lines.length > MAX_DECLARATION_LINES ? [...lines.slice(0, MAX_DECLARATION_LINES), "  // ..."].join("\n") : text;
}

function signatureText(node) {
  const sourceFile = node.getSourceFile();
  if (ts.isVariableDeclaration(node) && node.initializer && ts.isArrowFunction(node.initializer)) {
    const arrow = node.initializer.equalsGreaterThanToken;
    return "const " + sourceFile.text.slice(node.getStart(sourceFile), arrow.getStart(sourceFile)).trimEnd() + ";";
  }
  const body = node.body || (node.initializer && node.initializer.body);
  if (!body) return node.getText(sourceFile);
  const prefix = ts.isVariableDeclaration(node) ? "const " : "";
  return prefix + sourceFile.text.slice(node.getStart(sourceFile), body.getStart(sourceFile)).trimEnd() + ";";
}

function functionDeclarations(program, root) {
  const found = [];
  for (const sourceFile of program.getSourceFiles()) {
    if (!sourceFile.fileName.startsWith(root + path.sep) || sourceFile.isDeclarationFile) continue;
    const visit = (node) => {
      if (ts.isFunctionDeclaration(node) && node.name) found.push({node, name: node.name.text, owner: ""});
      else if (ts.isMethodDeclaration(node) && ts.isClassDeclaration(node.parent) && node.name) {
        found.push({node, name: node.name.getText(sourceFile), owner: node.parent.name ? node.parent.name.text : ""});
      } else if (ts.isVariableDeclaration(node) && node.initializer && ts.isIdentifier(node.name) &&
          (ts.isArrowFunction(node.initializer) || ts.isFunctionExpression(node.initializer))) {
        found.push({node, name: node.name.text, owner: ""});
      }
      if (!ts.isFunctionLike(node)) ts.forEachChild(node, visit);
    };
    visit(sourceFile);
  }
  return found;
}

const UNSPECIFIC = ts.TypeFlags.Any | ts.TypeFlags.Unknown | ts.TypeFlags.Never | ts.TypeFlags.Void;
const SCALARS = ts.TypeFlags.StringLike | ts.TypeFlags.NumberLike | ts.TypeFlags.BooleanLike;

// Same levels as the Python ranking (rag/codectx/python/headers.py).
function fit(checker, returned, goal, depth) {
  if (!returned || returned.flags & UNSPECIFIC) return undefined;
  if (returned === goal) return [100, "exact"];
  if (checker.isTypeAssignableTo(returned, goal)) return [90, "assignable"];
  if (returned.isUnion() && returned.types.some((t) => !(t.flags & UNSPECIFIC) && checker.isTypeAssignableTo(t, goal))) {
    return [50, "wider"];
  }
  if (depth < 2) {
    for (const signature of returned.getCallSignatures()) {
      const inner = fit(checker, checker.getReturnTypeOfSignature(signature), goal, depth + 1);
      if (inner) return [inner[0] - 30, "codomain:" + (depth + 1)];
    }
  }
  if (depth === 0 && checker.isArrayType(returned)) {
    const element = checker.getTypeArguments(returned)[0];
    if (element && !(element.flags & UNSPECIFIC) && checker.isTypeAssignableTo(element, goal)) return [35, "container"];
  }
  return undefined;
}

function rankHeaders(checker, program, root, goal, holeFile, enclosing) {
  if (!goal || goal.flags & UNSPECIFIC) return [];
  const ranked = [];
  for (const candidate of functionDeclarations(program, root)) {
    if (candidate.node === enclosing) continue;
    const signature = checker.getSignatureFromDeclaration(candidate.node.initializer || candidate.node);
    if (!signature) continue;
    const result = fit(checker, checker.getReturnTypeOfSignature(signature), goal, 0);
    if (!result) continue;
    let score = result[0] * (goal.flags & SCALARS ? 0.5 : 1);
    const where = location(root, candidate.node);
    if (candidate.node.getSourceFile().fileName === holeFile) score += 5;
    score -= 0.5 * signature.getParameters().length;
    ranked.push({candidate, score, reason: result[1], where});
  }
  ranked.sort((a, b) => b.score - a.score || (a.where.path < b.where.path ? -1 : a.where.path > b.where.path ? 1 : 0) ||
    a.where.line - b.where.line);
  return ranked.slice(0, MAX_HEADERS).map(({candidate, reason, where}) => ({
    kind: "header", name: candidate.name, detail: reason, ...where,
    text: signatureText(candidate.node) + (candidate.owner ? "  // method of " + candidate.owner : ""),
  }));
}

function bindings(checker, root, hole, enclosing) {
  const flags = ts.SymbolFlags.Variable | ts.SymbolFlags.Function | ts.SymbolFlags.Class | ts.SymbolFlags.Alias |
    ts.SymbolFlags.Enum;
  const found = [];
  for (const symbol of checker.getSymbolsInScope(hole, flags)) {
    const declaration = (symbol.declarations || [])[0];
    if (!declaration || !inWorkspace(root, declaration) || symbol.name === SENTINEL) continue;
    const local = enclosing && declaration.pos >= enclosing.pos && declaration.end <= enclosing.end;
    const type = bindingType(checker, symbol, hole);
    found.push({kind: "binding", name: symbol.name, text: "", detail: type, scope: local ? "local" : "module",
      ...location(root, declaration)});
  }
  found.sort((a, b) => (a.scope === b.scope ? 0 : a.scope === "local" ? -1 : 1) || a.line - b.line ||
    (a.name < b.name ? -1 : 1));
  return found.slice(0, MAX_BINDINGS);
}

// A type-only import (an interface, a type alias) has no value type: say what it is instead.
function bindingType(checker, symbol, hole) {
  let target = symbol.flags & ts.SymbolFlags.ExportValue ? checker.getExportSymbolOfSymbol(symbol) : symbol;
  if (target.flags & ts.SymbolFlags.Alias) target = checker.getAliasedSymbol(target);
  if (!(target.flags & ts.SymbolFlags.Value)) return "type " + target.name;
  return render(checker, checker.getTypeOfSymbolAtLocation(target, hole));
}

function context(request) {
  const state = sync(request);
  const program = state.service.getProgram();
  const checker = program.getTypeChecker();
  const holeFile = path.join(request.root, request.path);
  const sourceFile = program.getSourceFile(holeFile);
  if (!sourceFile) throw new Error("file not loaded: " + request.path);
  const hole = findHole(sourceFile, request.offset);
  if (!hole) return {expected_type: "", source: "", bindings: [], type_definitions: [], headers: []};
  const enclosing = ts.findAncestor(hole, ts.isFunctionLike);
  const {type, source} = expectedType(checker, hole);
  const inScope = bindings(checker, request.root, hole, enclosing);
  const seeds = symbolsOfType(checker, type, []);
  if (ts.isPropertyAccessExpression(hole.parent)) symbolsOfType(checker, checker.getTypeAtLocation(hole.parent.expression), seeds);
  for (const symbol of checker.getSymbolsInScope(hole, ts.SymbolFlags.Variable)) {
    const declaration = (symbol.declarations || [])[0];
    if (declaration && enclosing && declaration.pos >= enclosing.pos && declaration.end <= enclosing.end) {
      symbolsOfType(checker, checker.getTypeOfSymbolAtLocation(symbol, hole), seeds);
    }
  }
  const closure = typeClosure(checker, request.root, seeds).map((d) => ({
    kind: "type_definition", name: d.name ? d.name.text : "", text: declarationText(d), detail: ts.SyntaxKind[d.kind],
    ...location(request.root, d),
  }));
  return {expected_type: render(checker, type), source, bindings: inScope, type_definitions: closure,
    headers: rankHeaders(checker, program, request.root, type, holeFile, enclosing)};
}

function check(request) {
  const state = sync(request);
  const file = path.join(request.root, request.path);
  const diagnostics = [...state.service.getSyntacticDiagnostics(file), ...state.service.getSemanticDiagnostics(file)];
  return diagnostics.map((d) => {
    const position = d.file && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start) : {line: 0, character: 0};
    return {message: ts.flattenDiagnosticMessageText(d.messageText, "\n"), line: position.line + 1,
      column: position.character + 1, severity: d.category === ts.DiagnosticCategory.Error ? "error" : "warning"};
  });
}

const OPERATIONS = {context, check, ping: () => ({typescript: ts.version})};

readline.createInterface({input: process.stdin}).on("line", (line) => {
  let request = {};
  let reply;
  try {
    request = JSON.parse(line);
    const operation = OPERATIONS[request.op];
    if (!operation) throw new Error("unknown op " + request.op);
    reply = {id: request.id, ok: true, result: operation(request)};
  } catch (error) {
    reply = {id: request.id, ok: false, error: String(error && error.stack ? error.stack : error)};
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
});
