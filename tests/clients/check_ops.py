#!/usr/bin/env python3
"""Checks the operations files in ops/ against each other and the engine's CLI.

  check_ops.py BIN      BIN: the recstream binary, e.g. target/release/recstream

- every YAML file under ops/ parses (all documents of multi-document files);
- the Grafana dashboard parses, has its `datasource` and `variant` variables,
  and every panel has at least one query with an expression;
- every alert's `runbook` annotation names a section of ops/README.md;
- every engine invocation (the Dockerfile's ENTRYPOINT + CMD, the container
  commands/args of ops/k8s/ workloads, the `command`s of compose services
  that run the engine image) uses only subcommands and --flags that
  `BIN --help` and `BIN <subcommand> --help` list.

Standard library and PyYAML only. Exits 1 with one line per problem, or prints
one summary line.
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
DASHBOARD = OPS / "grafana" / "recstream-dashboard.json"
DOCKERFILE = OPS / "Dockerfile"
COMPOSE = OPS / "compose.yaml"
README = OPS / "README.md"
ENGINE = "recstream"  # binary name; images whose name contains it run the engine

errors = []


def error(msg):
    errors.append(msg)


def rel(path):
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------ YAML


def load_yaml_files():
    """Every YAML file under ops/ -> list of its documents (None if it failed)."""
    docs = {}
    paths = sorted(p for p in OPS.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())
    for path in paths:
        try:
            with path.open(encoding="utf-8") as f:
                docs[path] = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            error(f"{rel(path)}: invalid YAML: {' '.join(str(e).split())}")
            docs[path] = None
    if not paths:
        error("ops/: no YAML files found")
    return docs


# ------------------------------------------------------------- dashboard


def iter_panels(panels):
    for p in panels or []:
        yield p
        # Collapsed rows keep their panels inside the row.
        yield from iter_panels(p.get("panels"))


def check_dashboard():
    try:
        dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        error(f"{rel(DASHBOARD)}: {e}")
        return 0, 0
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        error(f"{rel(DASHBOARD)}: no `datasource` variable of type datasource (prometheus)")
    if "variant" not in variables:
        error(f"{rel(DASHBOARD)}: no `variant` variable")
    panels = queries = 0
    for p in iter_panels(dash.get("panels")):
        if p.get("type") == "row":
            continue
        panels += 1
        exprs = [t.get("expr", "").strip() for t in p.get("targets", []) or []]
        exprs = [e for e in exprs if e]
        if not exprs:
            error(f"{rel(DASHBOARD)}: panel {p.get('title')!r} has no target with an expr")
        queries += len(exprs)
    if panels == 0:
        error(f"{rel(DASHBOARD)}: no panels")
    return panels, queries


# -------------------------------------------------------------- runbooks


def github_anchor(heading):
    """GitHub's heading slug: lower case, punctuation dropped, spaces to dashes."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def check_runbooks(yaml_docs):
    anchors = set()
    try:
        for line in README.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^#{1,6}\s+(.*)$", line)
            if m:
                anchors.add(github_anchor(m.group(1)))
    except OSError as e:
        error(f"{rel(README)}: {e}")
        return 0
    checked = 0
    for path, docs in yaml_docs.items():
        if not docs or "rules" not in path.parts:
            continue
        for doc in docs:
            for group in (doc or {}).get("groups", []) or []:
                for rule in group.get("rules", []) or []:
                    if "alert" not in rule:
                        continue
                    runbook = (rule.get("annotations") or {}).get("runbook")
                    if not runbook:
                        error(f"{rel(path)}: alert {rule['alert']} has no runbook annotation")
                        continue
                    target, _, anchor = runbook.partition("#")
                    if target != "ops/README.md" or anchor not in anchors:
                        error(f"{rel(path)}: alert {rule['alert']}: runbook {runbook!r} is not a section of ops/README.md")
                    checked += 1
    return checked


# ----------------------------------------------------------- CLI help


class Help:
    """Subcommands, long/short options and positional arguments of one
    `--help` page in clap's format."""

    def __init__(self, text):
        self.commands = set()
        self.options = {}  # "--name" -> takes a value
        self.shorts = {}  # "-x" -> takes a value
        self.positionals = 0
        section = None
        for raw in text.splitlines():
            line = re.sub(r"\x1b\[[0-9;]*m", "", raw).rstrip()
            if not line:
                continue
            header = re.match(r"^(\S.*):$", line)
            if header:
                section = header.group(1).lower()
                continue
            if not line[0].isspace():
                section = None  # e.g. "Usage: ..." or the about text
                continue
            indent = len(line) - len(line.lstrip())
            if section == "commands":
                m = re.match(r"^ {2}([A-Za-z0-9][\w-]*)(?:,\s*[\w-]+)*(?:\s{2,}|$)", line)
                if m:
                    self.commands.add(m.group(1))
            elif section and section.endswith("options"):
                # Option lines start at column 2 (-x, --long) or 6 (--long);
                # descriptions and their continuations are indented further.
                if indent > 6:
                    continue
                m = re.match(
                    r"^\s+(?:(-[A-Za-z0-9])(?:,\s+|\s|$))?(--[A-Za-z0-9][\w-]*)?(?:[ =](\[?<[^>]+>))?",
                    line,
                )
                if not m or not (m.group(1) or m.group(2)):
                    continue
                takes_value = m.group(3) is not None
                if m.group(2):
                    self.options[m.group(2)] = takes_value
                if m.group(1):
                    self.shorts[m.group(1)] = takes_value
            elif section == "arguments":
                if indent <= 6 and re.match(r"^\s+[\[<]", line):
                    self.positionals += 1


class Cli:
    def __init__(self, binary):
        self.binary = binary
        self.pages = {}

    def help(self, path):
        key = tuple(path)
        if key not in self.pages:
            cmd = [self.binary, *path, "--help"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("RECSTREAM_")}
            env["NO_COLOR"] = "1"
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SystemExit(f"check_ops: cannot run {' '.join(cmd)}: {e}")
            if out.returncode != 0:
                raise SystemExit(
                    f"check_ops: `{' '.join(cmd)}` exited {out.returncode}: {out.stderr.strip()}"
                )
            page = Help(out.stdout)
            if not page.options:
                raise SystemExit(
                    f"check_ops: `{' '.join(cmd)}` printed no Options: section; is this clap's help format?"
                )
            self.pages[key] = page
        return self.pages[key]

    def check(self, args, where):
        """Checks one engine invocation (the arguments after the binary)."""
        path = []
        page = self.help(path)
        i = 0
        while i < len(args) and page.commands and args[i] in page.commands and args[i] != "help":
            path.append(args[i])
            i += 1
            page = self.help(path)
        shown = " ".join([ENGINE, *path])
        if not path:
            first = args[0] if args else "(nothing)"
            error(f"{where}: {first!r} is not a subcommand of {ENGINE} (known: {', '.join(sorted(self.help([]).commands))})")
            return None
        if page.commands:
            error(f"{where}: `{shown}` needs a subcommand ({', '.join(sorted(page.commands - {'help'}))})")
            return None
        only_positionals = False
        while i < len(args):
            tok = args[i]
            i += 1
            if only_positionals or not tok.startswith("-") or tok == "-":
                if page.positionals == 0:
                    error(f"{where}: `{shown}` takes no argument {tok!r}")
                continue
            if tok == "--":
                only_positionals = True
                continue
            if tok.startswith("--"):
                name, eq, _ = tok.partition("=")
                if name not in page.options:
                    error(f"{where}: `{shown}` has no flag {name} (its flags: {', '.join(sorted(page.options))})")
                    if not eq and i < len(args) and not args[i].startswith("-"):
                        i += 1  # most likely its value; one error is enough
                    continue
                takes_value = page.options[name]
            else:
                name, eq = tok[:2], len(tok) > 2
                if name not in page.shorts:
                    error(f"{where}: `{shown}` has no flag {name}")
                    continue
                takes_value = page.shorts[name]
            if takes_value and not eq:
                if i >= len(args):
                    error(f"{where}: `{shown} {name}` needs a value")
                else:
                    i += 1
            elif not takes_value and eq and tok.startswith("--"):
                error(f"{where}: `{shown} {name}` takes no value")
        return " ".join(path)


# ---------------------------------------------------- engine invocations


def is_engine(executable):
    return pathlib.PurePosixPath(str(executable)).name == ENGINE


def as_list(value, where):
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    error(f"{where}: expected a string or a list of strings, got {value!r}")
    return None


def dockerfile_invocations():
    """ENTRYPOINT + CMD of the Dockerfile's final stage, in exec form."""
    try:
        text = DOCKERFILE.read_text(encoding="utf-8")
    except OSError as e:
        error(f"{rel(DOCKERFILE)}: {e}")
        return []
    # Join continuation lines; drop comments.
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    entrypoint = cmd = None
    for line in logical:
        m = re.match(r"^\s*(FROM|ENTRYPOINT|CMD)\s+(.*)$", line, re.IGNORECASE)
        if not m:
            continue
        instr, rest = m.group(1).upper(), m.group(2).strip()
        if instr == "FROM":
            entrypoint = cmd = None  # a new stage starts afresh
            continue
        try:
            value = json.loads(rest)
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError
        except ValueError:
            error(f"{rel(DOCKERFILE)}: {instr} must be in exec form (a JSON list of strings): {rest}")
            continue
        if instr == "ENTRYPOINT":
            entrypoint = value
        else:
            cmd = value
    if not entrypoint or not is_engine(entrypoint[0]):
        error(f"{rel(DOCKERFILE)}: the final stage's ENTRYPOINT must run {ENGINE}, is {entrypoint}")
        return []
    if cmd is None:
        error(f"{rel(DOCKERFILE)}: the final stage has no CMD")
        return []
    return [(f"{rel(DOCKERFILE)} ENTRYPOINT+CMD", entrypoint[1:] + cmd)]


def pod_spec(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind in ("StatefulSet", "Deployment", "DaemonSet", "ReplicaSet", "Job"):
        return (spec.get("template") or {}).get("spec")
    if kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        return (job.get("template") or {}).get("spec")
    return None


def k8s_invocations(yaml_docs):
    found = []
    for path, docs in yaml_docs.items():
        if not docs or "k8s" not in path.relative_to(OPS).parts:
            continue
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            spec = pod_spec(doc)
            if not spec:
                continue
            name = (doc.get("metadata") or {}).get("name")
            for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
                where = f"{rel(path)} {doc['kind']}/{name} container {c.get('name')}"
                command = as_list(c.get("command"), where + " command")
                args = as_list(c.get("args"), where + " args") or []
                if command:
                    if is_engine(command[0]):
                        found.append((where, command[1:] + args))
                elif ENGINE in str(c.get("image", "")):
                    # No command: the image's ENTRYPOINT (the engine) gets the args.
                    found.append((where, args))
    return found


def compose_invocations(yaml_docs):
    docs = yaml_docs.get(COMPOSE)
    if not docs:
        if COMPOSE not in yaml_docs:
            error(f"{rel(COMPOSE)}: missing")
        return []
    found = []
    for name, svc in (docs[0].get("services") or {}).items():
        build = svc.get("build")
        dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
        engine_image = dockerfile.endswith("ops/Dockerfile") or ENGINE in str(svc.get("image", ""))
        where = f"{rel(COMPOSE)} service {name}"
        entrypoint = as_list(svc.get("entrypoint"), where + " entrypoint")
        command = as_list(svc.get("command"), where + " command")
        if entrypoint:
            if is_engine(entrypoint[0]):
                found.append((where, entrypoint[1:] + (command or [])))
        elif engine_image and command is not None:
            found.append((where, command))
    return found


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    binary = sys.argv[1]
    if not os.access(binary, os.X_OK):
        print(f"check_ops: {binary} is not an executable file (build it: cargo build --release)", file=sys.stderr)
        return 2
    yaml_docs = load_yaml_files()
    panels, queries = check_dashboard()
    runbooks = check_runbooks(yaml_docs)

    cli = Cli(binary)
    sources = {
        "Dockerfile": dockerfile_invocations(),
        "k8s": k8s_invocations(yaml_docs),
        "compose": compose_invocations(yaml_docs),
    }
    used = set()
    for source, invocations in sources.items():
        if not invocations:
            error(f"{source}: no engine invocation found to check")
        for where, args in invocations:
            sub = cli.check(args, where)
            if sub:
                used.add(sub)

    if errors:
        for e in errors:
            print(f"check_ops: {e}", file=sys.stderr)
        print(f"check_ops: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    n_files = len(yaml_docs)
    n_docs = sum(len(d) for d in yaml_docs.values() if d)
    n_calls = sum(len(v) for v in sources.values())
    print(
        f"check_ops: ok: {n_files} YAML files ({n_docs} documents), dashboard {panels} panels / "
        f"{queries} queries, {runbooks} runbook links, {n_calls} engine invocations "
        f"({', '.join(sorted(used))}) match `{ENGINE} --help`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
