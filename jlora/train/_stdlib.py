"""Offline datasets derived from the Python standard library of the running interpreter.

Every public function, class and method of a fixed list of stdlib modules that has
a docstring becomes a `Record`: its qualified name, its signature (from
`inspect.signature`) and the first line of its docstring. Records are ordered by
module and qualified name, so a given interpreter always produces the same list: they are
read in a fresh interpreter (`python -I` running this file), because the process that
asks may have patched the standard library (a Jupyter kernel replaces `builtins.input`
and `getpass.getpass`, pytest `pdb.set_trace`), which would change the data.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import re
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["HELD_OUT", "TRAIN", "TRAIN_MORE", "Record", "code_search_split", "records"]

# Modules to train on, and a disjoint held-out set to evaluate on. Both fixed lists; a
# module the interpreter cannot import (platform-specific) is skipped.
TRAIN: tuple[str, ...] = (
  "abc", "argparse", "ast", "asyncio", "binascii", "builtins", "bz2", "cmath",
  "cmd", "code", "codecs", "collections", "colorsys", "compileall", "concurrent.futures", "configparser",
  "contextlib", "copyreg", "ctypes", "dataclasses", "datetime", "dbm", "decimal", "dis",
  "doctest", "email", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
  "functools", "gc", "getopt", "getpass", "gettext", "glob", "graphlib", "grp", "hashlib",
  "hmac", "html", "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "importlib",
  "importlib.util", "inspect", "io", "ipaddress", "itertools", "keyword", "linecache", "locale", "logging",
  "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes", "mmap", "modulefinder",
  "multiprocessing", "netrc", "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
  "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posix", "pprint", "profile", "pstats",
  "py_compile", "pyclbr", "pydoc", "quopri", "re", "reprlib", "resource", "rlcompleter",
  "runpy", "sched", "secrets", "select", "shlex", "signal", "site", "smtplib",
  "socket", "socketserver", "sqlite3", "ssl", "stat", "string", "stringprep", "struct",
  "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "termios",
  "threading", "time", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "tty", "types",
  "typing", "unicodedata", "unittest", "unittest.mock", "urllib.request", "uuid", "warnings",
  "wave", "weakref", "wsgiref.util", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client",
  "zipimport", "zlib", "zoneinfo",
)
HELD_OUT: tuple[str, ...] = (
  "array", "atexit", "contextvars", "errno", "faulthandler", "fcntl", "json", "json.decoder", "json.encoder",
  "posixpath", "pty", "pwd", "shelve", "string.templatelib", "textwrap", "urllib.error", "zipapp",
  "sre_compile", "selectors", "heapq", "readline", "copy", "csv", "bisect", "statistics", "difflib",
  "tarfile", "calendar", "ftplib", "zipfile", "shutil", "random", "base64", "tempfile", "urllib.parse", "queue",
  "gzip",
)

# More training modules (submodules of packages and modules the lists above leave out), none sharing a top-level
# package with a held-out module; the code-search job trains on them too (`code_search_split(more=...)`).
TRAIN_MORE: tuple[str, ...] = (
  "asynchat", "asyncio.base_events", "asyncio.base_subprocess", "asyncio.events", "asyncio.exceptions",
  "asyncio.locks", "asyncio.protocols", "asyncio.runners", "asyncio.selector_events", "asyncio.sslproto",
  "asyncio.streams", "asyncio.subprocess", "asyncio.tasks", "asyncio.timeouts", "asyncio.transports",
  "asyncio.unix_events", "audioop", "bdb", "cgi", "cgitb", "chunk", "codeop", "collections.abc",
  "concurrent.futures.process", "concurrent.futures.thread", "email.base64mime", "email.charset", "email.encoders",
  "email.errors", "email.feedparser", "email.generator", "email.header", "email.headerregistry", "email.iterators",
  "email.message", "email.parser", "email.policy", "email.quoprimime", "http.cookiejar", "imghdr", "imp",
  "importlib.abc", "importlib.metadata", "importlib.resources.abc", "importlib.resources.readers",
  "importlib.resources.simple", "logging.config", "mailcap", "multiprocessing.connection", "multiprocessing.context",
  "multiprocessing.dummy", "multiprocessing.forkserver", "multiprocessing.managers", "multiprocessing.pool",
  "multiprocessing.process", "multiprocessing.reduction", "multiprocessing.resource_tracker",
  "multiprocessing.shared_memory", "multiprocessing.sharedctypes", "multiprocessing.spawn", "multiprocessing.util",
  "nntplib", "pyexpat", "smtpd", "sndhdr", "spwd", "telnetlib", "unittest.async_case", "unittest.case",
  "unittest.loader", "unittest.result", "unittest.runner", "unittest.suite", "unittest.util", "uu", "webbrowser",
  "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.types", "xdrlib", "xml.dom",
  "xml.dom.expatbuilder", "xml.dom.pulldom", "xml.dom.xmlbuilder", "xml.sax.expatreader", "xml.sax.handler",
  "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.server",
)


@dataclasses.dataclass(frozen=True)
class Record:
  """One documented callable: `module`, `qualname`, `signature` (may be empty) and `doc` (first line)."""

  module: str
  qualname: str
  signature: str
  doc: str

  @property
  def code(self) -> str:
    """`module.qualname(signature)`, the text a code-search query should find."""
    return f"{self.module}.{self.qualname}{self.signature}"


def _first_line(obj: object) -> str:
  doc = inspect.getdoc(obj) or ""
  line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
  return re.sub(r"\s+", " ", line)


def _literal(value: object) -> bool:
  if value is None or isinstance(value, bool | int | float | complex | str | bytes):
    return len(repr(value)) <= 40
  return isinstance(value, tuple | frozenset) and all(_literal(v) for v in value)


def _signature(obj: object) -> str:
  """`str(inspect.signature(obj))`, with defaults that are not literals shown as `...`.

  A default such as `logging.shutdown(handlerList=[<weakref ...>])` depends on the
  process's state; writing `...` keeps the text the same in every process.
  """
  try:
    sig = inspect.signature(obj)
  except (TypeError, ValueError):
    return ""
  params = [p.replace(default=Ellipsis) if p.default is not p.empty and not _literal(p.default) else p
            for p in sig.parameters.values()]
  return str(sig.replace(parameters=params, return_annotation=sig.empty))


def _public(module: object, name: str) -> list[tuple[str, object]]:
  obj = getattr(module, name)
  out = [(name, obj)]
  if inspect.isclass(obj):
    for attr, member in sorted(vars(obj).items()):
      if not attr.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
        out.append((f"{name}.{attr}", member))
  return out


def _module_records(name: str) -> list[Record]:
  try:
    module = importlib.import_module(name)
  except Exception:  # platform-specific or broken module: skip it
    return []
  out = []
  for attr in sorted(vars(module)):
    obj = vars(module)[attr]
    if attr.startswith("_") or getattr(obj, "__module__", None) != name:
      continue
    if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
      continue
    for qualname, member in _public(module, attr):
      doc = _first_line(member)
      short = qualname.rsplit(".", 1)[-1]
      # Docstrings that spell out the call ("S.split(sep) -> list") would give the answer away.
      if len(doc) < 12 or "->" in doc or f"{short}(" in doc or short in doc.split():
        continue
      out.append(Record(name, qualname, _signature(member), doc))
  return out


def records(modules: Iterable[str]) -> list[Record]:
  """The records of `modules`, in the given module order, then by qualified name."""
  with warnings.catch_warnings():  # importing and inspecting deprecated modules (`typing.re`) warns
    warnings.simplefilter("ignore")
    return [r for m in modules for r in _module_records(m)]


def _unique(recs: Sequence[Record]) -> list[Record]:
  """Drops every record whose docstring line or code text occurs more than once."""
  docs = Counter(r.doc.lower() for r in recs)
  codes = Counter(r.code for r in recs)
  return [r for r in recs if docs[r.doc.lower()] == 1 and codes[r.code] == 1]


def code_search_split(
  train_modules: Sequence[str] = TRAIN, eval_modules: Sequence[str] = HELD_OUT, more: Sequence[str] = ()
) -> tuple[list[Record], list[Record]]:
  """`(train, held_out)` records from disjoint module lists, deduplicated across both.

  A docstring line or code text that occurs twice anywhere (e.g. `posixpath` and
  `os.path`, or an inherited method) is dropped from both splits, so no held-out
  query or answer is seen in training. The records of the `more` modules join the
  training split where their docstring line and code text occur nowhere else (in
  any of the three lists): the held-out split is the same with or without them.

  Raises:
    ValueError: if the module lists overlap.
  """
  lists = {"train_modules": train_modules, "eval_modules": eval_modules, "more": more}
  for x, y in (("train_modules", "eval_modules"), ("more", "eval_modules"), ("more", "train_modules")):
    overlap = sorted(set(lists[x]) & set(lists[y]))
    if overlap:
      raise ValueError(f"`{x}` and `{y}` must be disjoint; both list {overlap}.")
  train, held = _split(tuple(train_modules), tuple(eval_modules), tuple(more))
  return list(train), list(held)


@functools.lru_cache(maxsize=4)
def _split(train_modules: tuple[str, ...], eval_modules: tuple[str, ...],
           more: tuple[str, ...]) -> tuple[tuple[Record, ...], tuple[Record, ...]]:
  """`code_search_split`, once per process and module lists (records are immutable; inspecting takes seconds)."""
  train, held, extra = _fresh_records([train_modules, eval_modules, more])
  keep = set(_unique(train + held))
  added = set(_unique(train + held + extra)) & set(extra)
  kept_train = tuple(r for r in train if r in keep) + tuple(r for r in extra if r in added)
  return kept_train, tuple(r for r in held if r in keep)


def _fresh_records(lists: Sequence[Sequence[str]]) -> list[list[Record]]:
  """`records` of each module list, read in a fresh, isolated interpreter: the same in any process.

  Raises:
    RuntimeError: if that interpreter (`sys.executable`) cannot be run.
  """
  try:
    proc = subprocess.run([sys.executable, "-I", __file__], input=json.dumps([list(m) for m in lists]),
                          capture_output=True, text=True, check=True, timeout=600)
  except (OSError, subprocess.SubprocessError) as e:
    detail = getattr(e, "stderr", None) or e
    raise RuntimeError(f"reading the standard library's docstrings in a fresh interpreter ({sys.executable!r}, "
                       f"isolated) failed: {detail}") from None
  return [[Record(*fields) for fields in found] for found in json.loads(proc.stdout)]


if __name__ == "__main__":  # the fresh interpreter of `_fresh_records`: module lists on stdin, records on stdout
  json.dump([[dataclasses.astuple(r) for r in records(modules)] for modules in json.load(sys.stdin)], sys.stdout)
