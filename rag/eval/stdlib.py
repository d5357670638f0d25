"""A paraphrase-heavy retrieval set on real text nobody here wrote: the docstrings of Python
standard-library modules (read offline from the running interpreter), with questions phrased the way a
user asks them, avoiding each module's name and, as far as possible, its docstring's own words.

A document is one module: its docstring, then the first paragraph of each public class's and function's
docstring, cut at `max_chars`. A question's gold is the module that answers it (document level). The text
depends on the Python version; the questions only on what the modules do.
"""

from __future__ import annotations

import importlib
import inspect

from longbow.rag.eval.synthetic import Corpus, Question
from longbow.rag.types import Document

# Modules whose answers are asked for, then distractors (the rest of a stdlib tour).
QUESTIONS: list[tuple[str, str]] = [
    ("heapq", "How do I always pull out the smallest item first from a collection that keeps changing?"),
    ("bisect", "Where does a new value belong in an already ordered list so that it stays ordered?"),
    ("functools",
     "How can I remember results of an expensive call so repeating it with the same inputs is instant?"),
    ("collections", "Which container tallies how many times each thing occurs?"),
    ("textwrap", "How do I break a long paragraph into lines no wider than a fixed number of characters?"),
    ("difflib", "How can I suggest the most similar spellings from a list when someone mistypes a word?"),
    ("shutil", "How do I duplicate a whole folder including everything inside it?"),
    ("tempfile", "Where can I get a scratch file that disappears once I am done with it?"),
    ("glob", "Find all the paths on disk that fit a wildcard like *.txt"),
    ("re", "How do I pull every phone number out of a text by describing what they look like?"),
    ("struct", "How do I turn numbers into the raw byte layout a C program expects?"),
    ("zlib", "How do I shrink a byte string in memory and get a quick checksum of it?"),
    ("hashlib", "How do I compute a fingerprint of a file's contents to detect tampering?"),
    ("secrets", "What should I use to make an unguessable code for a password reset email?"),
    ("random", "How do I shuffle a deck of cards or pick one card by chance?"),
    ("statistics", "How do I find the middle value and the spread of a list of measurements?"),
    ("fractions", "How do I do exact arithmetic with ratios like one third without rounding errors?"),
    ("calendar", "How do I print a month as a grid of days, with weeks beginning on a chosen weekday?"),
    ("sched", "How do I run functions at particular future moments from a single thread?"),
    ("queue", "What lets several worker threads hand jobs to each other safely?"),
    ("subprocess", "How do I launch an external program and capture what it prints?"),
    ("shlex", "How do I split a command string the way bash would, respecting quotes?"),
    ("argparse", "How do I let people pass flags and positional values when they start my script?"),
    ("logging", "How do I record what my program does at different severity levels into a file?"),
    ("pprint", "How do I display a deeply nested structure in a readable indented layout?"),
    ("copy", "How do I clone an object together with all the objects nested inside it?"),
    ("pickle", "How do I save an arbitrary Python object to disk and load it back later?"),
    ("shelve", "I want a dict-like thing on disk that survives restarts and can hold any Python object."),
    ("sqlite3", "How do I use a relational database kept in one file without running a server?"),
    ("uuid", "How do I make identifiers that practically never collide across machines?"),
    ("base64", "How do I turn binary data into plain printable characters for an email or a URL?"),
    ("html", "How do I make text safe to put inside a web page by replacing angle brackets and ampersands?"),
    ("urllib.parse", "How do I break a web address into its scheme, host, path and query string?"),
    ("smtplib", "How do I send mail through an outgoing mail server?"),
    ("weakref", "How do I refer to an object without keeping it alive?"),
    ("abc", "How do I declare a base class whose methods every subclass must provide?"),
    ("contextlib",
     "How do I write a function that sets something up and guarantees cleanup when a block ends?"),
    ("dataclasses", "How do I get __init__ and __repr__ generated automatically from annotated fields?"),
    ("enum", "How do I define a fixed set of named constants such as colours or states?"),
    ("typing", "How do I annotate that a parameter may be a list of ints or nothing at all?"),
    ("inspect", "How do I find out at runtime which arguments a function accepts?"),
    ("dis", "How do I see the low-level instructions the interpreter executes for a function?"),
    ("ast", "How do I turn Python source into a structure I can walk and rewrite?"),
    ("traceback", "How do I print the chain of calls that led to an exception?"),
    ("warnings",
     "How do I tell users a function will go away in a future release without stopping the program?"),
    ("unittest", "How do I organise automated checks of my code into classes with setup and assertions?"),
    ("doctest",
     "Can the examples in my function documentation be run to check they still give the shown output?"),
    ("timeit", "How do I measure accurately how long a tiny snippet takes?"),
    ("pdb", "How do I pause my program and step through it line by line?"),
    ("gc", "How do I reclaim objects that point at each other in loops?"),
    ("atexit", "How do I make a function run automatically when the interpreter shuts down normally?"),
    ("getpass", "How do I ask for a password without showing what is typed?"),
    ("locale", "How do I format numbers with the digit grouping customary in the user's country?"),
    ("gettext", "How do I translate my program's messages into other languages?"),
    ("colorsys", "How do I convert a colour from red-green-blue to hue, saturation and brightness?"),
    ("wave", "How do I read the frames of an uncompressed audio recording?"),
    ("mimetypes", "How do I figure out the content type of a file from its extension?"),
    ("configparser", "How do I read settings from an INI file with bracketed headings?"),
    ("ipaddress", "How do I check whether an address belongs to a given subnet?"),
    ("graphlib", "How do I order tasks so that each comes after the ones it depends on?"),
    ("math", "Where do I find square roots, logarithms and trigonometric functions?"),
    ("array", "How do I store a long sequence of numbers of one type compactly?"),
    ("io", "How do I treat an in-memory string as if it were an open file?"),
    ("platform", "How do I find out which operating system and processor my code runs on?"),
    ("faulthandler",
     "How do I get a Python stack dump when the interpreter crashes with a segmentation fault?"),
    ("xml.etree.ElementTree", "How do I parse a hierarchical markup document and iterate over its elements?"),
    ("ftplib", "How do I upload files to a remote machine over the old file transfer protocol?"),
    ("http.server", "How do I serve the files of the current folder to a browser for quick local testing?"),
    ("unicodedata", "How do I look up the official name or category of a character?"),
    ("cmd", "How do I build an interactive prompt where users type commands one line at a time?"),
    ("tokenize", "How do I split Python source into its lexical pieces, comments included?"),
    ("reprlib", "How do I display huge nested containers abbreviated, with the middle left out?"),
    ("json", "How do I convert a dict into text a web frontend written in another language can read?"),
    ("csv", "How do I read a spreadsheet exported as plain text rows with separated columns?"),
]
DISTRACTORS = """string gzip zipfile tarfile hmac decimal datetime threading socket selectors operator os
    concurrent.futures asyncio linecache numbers lzma bz2 pkgutil importlib tracemalloc quopri code webbrowser
    imaplib poplib socketserver xmlrpc.client optparse getopt fileinput stat tabnanny pyclbr symtable keyword
    copyreg marshal dbm http.client mmap plistlib netrc filecmp fnmatch""".split()
MAX_CHARS = 8000


def module_text(name: str, max_chars: int = MAX_CHARS) -> str:
    """The module's docstring, then `name: first paragraph` of each public class and function of it."""
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    public = getattr(module, "__all__", None) or [a for a in dir(module) if not a.startswith("_")]
    for attribute in sorted(public):
        value = getattr(module, attribute, None)
        if not (inspect.isclass(value) or callable(value)) or getattr(value, "__module__", name) != name:
            continue
        doc = inspect.getdoc(value)
        if doc:
            parts.append(f"{attribute}: {doc.split(chr(10) * 2)[0]}")
    return "\n\n".join(p for p in parts if p)[:max_chars]


def make_stdlib_corpus(max_chars: int = MAX_CHARS) -> Corpus:
    """Documents (id = module name) for every asked-about and distractor module, and the questions."""
    names = list(dict.fromkeys([name for name, _ in QUESTIONS] + DISTRACTORS))
    documents = [Document(name, text, {"kind": "stdlib"})
                 for name in names if (text := module_text(name, max_chars))]
    present = {d.document_id for d in documents}
    questions = [Question(f"stdlib-{i}", text, "", 1, [name], []) for i, (name, text) in enumerate(QUESTIONS)
                 if name in present]
    return Corpus(documents, questions)
