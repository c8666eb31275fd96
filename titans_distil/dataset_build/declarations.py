"""Languages and their declarations (functions, methods, classes with spans), parsed with tree-sitter.

The grammars are the pre-compiled ones of `tree-sitter-language-pack` (0.x wheels carry them; 1.x downloads
them at run time, which this project's offline machines cannot). Declarations are found with one tree-sitter
query per language (run in C), their nesting from their spans."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..errors import UserError

# file extension -> tree-sitter-language-pack grammar name
EXTENSIONS: dict[str, str] = {
    ".py": "python",
    ".pyi": "python",
    ".rs": "rust",
    ".go": "go",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".mts": "typescript",
    ".cts": "typescript",
    ".tsx": "tsx",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".hh": "cpp",
    ".hpp": "cpp",
    ".hxx": "cpp",
    ".java": "java",
}

# Captures: @function (a method when its closest container is a class or scope), @method (always a method),
# @class (a declaration that holds others), @scope (holds others but is no declaration itself: impl blocks,
# namespaces). Grammar node names as in each grammar's node-types.json.
_JS_QUERY = """
(function_declaration) @function
(generator_function_declaration) @function
(variable_declarator name: (identifier) value: [(arrow_function) (function_expression)]) @function
(class_declaration) @class
(method_definition) @method
"""
_TS_QUERY = (
    _JS_QUERY
    + """
(abstract_class_declaration) @class
(interface_declaration) @class
"""
)
_C_QUERY = """
(function_definition) @function
(struct_specifier body: (_)) @class
"""
QUERIES: dict[str, str] = {
    "python": "(function_definition) @function (class_definition) @class",
    "rust": """
        (function_item) @function
        (struct_item) @class (enum_item) @class (trait_item) @class
        (impl_item) @scope
    """,
    "go": """
        (function_declaration) @function
        (method_declaration) @method
        (type_spec type: [(struct_type) (interface_type)]) @class
    """,
    "javascript": _JS_QUERY,
    "typescript": _TS_QUERY,
    "tsx": _TS_QUERY,
    "c": _C_QUERY,
    "cpp": _C_QUERY
    + """
        (class_specifier body: (_)) @class
        (namespace_definition) @scope
    """,
    "java": """
        (method_declaration) @method (constructor_declaration) @method
        (class_declaration) @class (interface_declaration) @class (enum_declaration) @class
        (record_declaration) @class
    """,
}
LANGUAGES = tuple(sorted(QUERIES))
# Node types that hold the name of a C/C++ function at the bottom of its declarator chain.
_C_NAMES = {"identifier", "field_identifier", "qualified_identifier", "destructor_name", "operator_name"}


@dataclass(frozen=True)
class Declaration:
    """A function, method or class: `qualname` joins the names of its containers with '.'; lines are 1-based
    and inclusive, bytes half-open."""

    name: str
    qualname: str
    kind: str  # function | method | class
    start_line: int
    end_line: int
    start_byte: int
    end_byte: int

    def to_json(self) -> dict:
        return dict(vars(self))  # dataclasses.asdict deep-copies: 6% of the `ast` stage's time


def language_of(path: str) -> str | None:
    """The grammar for a file path, by extension; None for a language this pipeline does not parse."""
    return EXTENSIONS.get(PurePosixPath(path).suffix.lower())


def check_languages(names: tuple[str, ...]) -> tuple[str, ...]:
    """`--languages` as given, refused when it names a language without a grammar here."""
    unknown = [name for name in names if name not in LANGUAGES]
    if unknown:
        raise UserError(
            f"--languages: unknown language {', '.join(unknown)}; pick from {', '.join(LANGUAGES)}"
        )
    return names


def _pack():
    try:
        import tree_sitter
        import tree_sitter_language_pack
    except ImportError:
        raise UserError(
            "the dataset pipeline needs tree-sitter and its grammars; "
            "pip install 'titans-distil[data]' (tree-sitter, tree-sitter-language-pack<1, GitPython)"
        ) from None
    return tree_sitter, tree_sitter_language_pack


@functools.cache
def _parser_and_query(language: str):
    tree_sitter, pack = _pack()
    grammar = pack.get_language(language)
    return pack.get_parser(language), tree_sitter.Query(grammar, QUERIES[language])


def _c_function_name(node) -> str | None:
    declarator = node.child_by_field_name("declarator")
    while declarator is not None and declarator.type not in _C_NAMES:
        declarator = declarator.child_by_field_name("declarator")
    return declarator.text.decode("utf-8", "replace") if declarator is not None else None


def _name(node, language: str) -> str | None:
    if node.type == "function_definition" and language in ("c", "cpp"):
        return _c_function_name(node)
    if node.type == "impl_item":  # `impl Trait for Type`: its methods belong to Type
        field = node.child_by_field_name("type")
    else:
        field = node.child_by_field_name("name")
    if field is None:
        return None
    name = field.text.decode("utf-8", "replace")
    if node.type == "method_declaration" and language == "go":
        receiver = node.child_by_field_name("receiver")
        types = [n for n in _walk(receiver) if n.type == "type_identifier"] if receiver else []
        if types:
            return f"{types[0].text.decode('utf-8', 'replace')}.{name}"
    return name


def _walk(node):
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def _span_node(node):
    """The node whose text is the whole declaration: a decorated Python definition with its decorators, a JS
    `const f = () => ...` with its `const`, a Go `type T struct` with its `type`."""
    parent = node.parent
    if parent is None:
        return node
    if parent.type == "decorated_definition":
        return parent
    if node.type == "variable_declarator" and parent.type in ("lexical_declaration", "variable_declaration"):
        return parent if parent.named_child_count == 1 else node
    if node.type == "type_spec" and parent.type == "type_declaration" and parent.named_child_count == 1:
        return parent
    return node


@dataclass(frozen=True)
class ParsedFile:
    declarations: list[Declaration]
    syntax_error: bool


def parse(source: bytes, language: str) -> ParsedFile:
    """The declarations of a file in source order (containers before what they hold), and whether the file has
    a syntax error (tree-sitter still parses around it; callers decide what such a file is worth)."""
    import tree_sitter

    parser, query = _parser_and_query(language)
    tree = parser.parse(source)
    found = []
    for capture, nodes in tree_sitter.QueryCursor(query).captures(tree.root_node).items():
        for node in nodes:
            found.append((_span_node(node), node, capture))
    found.sort(key=lambda item: (item[0].start_byte, -item[0].end_byte))
    declarations: list[Declaration] = []
    containers: list[tuple[int, str, str]] = []  # (end byte, name, capture) of the enclosing nodes
    seen: dict[str, int] = {}
    for span, node, capture in found:
        while containers and containers[-1][0] <= span.start_byte:
            containers.pop()
        name = _name(node, language)
        if name is None:
            continue
        if capture != "function" and capture != "method":
            containers.append((span.end_byte, name, capture))
            if capture == "scope":
                continue
            kind = "class"
        else:
            in_class = bool(containers) and containers[-1][2] in ("class", "scope")
            kind = "method" if capture == "method" or in_class else "function"
            containers.append((span.end_byte, name, "function"))
        qualname = ".".join(entry[1] for entry in containers)
        seen[qualname] = seen.get(qualname, 0) + 1
        if seen[qualname] > 1:  # overloads, property setters, redefinitions
            qualname = f"{qualname}#{seen[qualname]}"
        declarations.append(
            Declaration(
                name=name,
                qualname=qualname,
                kind=kind,
                start_line=span.start_point[0] + 1,
                end_line=span.end_point[0] + 1,
                start_byte=span.start_byte,
                end_byte=span.end_byte,
            )
        )
    return ParsedFile(declarations, tree.root_node.has_error)
