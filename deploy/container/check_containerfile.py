#!/usr/bin/env python3
"""Static checks of deploy/container/Containerfile, for CI machines without a
container engine. Run through deploy/container/check.sh.

It parses the file (continuation lines, comments, exec/JSON form, flags) and
checks what a reviewer would: every COPY source from the build context is a
binary cross/build.sh produced, for the architecture of the stage that copies
it, and statically linked; the agent is the build with the kubernetes feature
(the DaemonSet runs `run --pipeline`); the per-architecture stages exist for every
platform we publish; the final stage runs as a numeric non-root user, has no
RUN (it has no shell) and no package manager, keeps the buffer on a VOLUME,
and starts the agent in exec form.
"""

import json
import os
import re
import shlex
import subprocess
import sys

PLATFORMS = {"amd64": "x86-64", "arm64": "ARM aarch64"}  # TARGETARCH -> `file` wording
PACKAGE_MANAGERS = re.compile(r"\b(apt|apt-get|aptitude|dpkg|apk|yum|dnf|microdnf|zypper|rpm|pip3?|npm|gem)\b")
BUFFER_VOLUME = "/var/lib/edgefleet"
AGENT_PATH = "/usr/local/bin/edge-agent"


class Instruction:
    def __init__(self, line, keyword, flags, args):
        self.line, self.keyword, self.flags, self.args = line, keyword, flags, args

    def exec_form(self):
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def words(self):
        form = self.exec_form()
        return form if form is not None else shlex.split(self.args, comments=False)


def parse(text):
    """Returns the instructions, joining continuation lines and dropping comments."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue  # blank, comment or parser directive
        if pending and stripped.startswith("#"):
            continue  # comments may sit inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        flags, rest = {}, rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        instructions.append(Instruction(start, keyword.upper(), flags, rest))
    if pending:
        raise SystemExit("Containerfile ends inside a continued line")
    return instructions


def stages(instructions):
    """Splits into (global, [stage dicts]) at each FROM."""
    global_part, result = [], []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            if len(words) not in (1, 3):
                raise SystemExit(f"line {ins.line}: cannot parse FROM {ins.args!r}")
            result.append({"from": ins, "base": words[0], "name": name, "body": []})
        elif result:
            result[-1]["body"].append(ins)
        else:
            global_part.append(ins)
    return global_part, result


def expand(value, variables):
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def image_name(words, source):
    """The file name a COPY gives `source` in the image."""
    destination = words[-1]
    if len(words) == 2 and not destination.endswith("/"):
        return os.path.basename(destination)
    return os.path.basename(source)


def has_pipeline(binary):
    """Whether the agent binary is the build with the kubernetes feature
    (cross/agent-build-kind.sh tells the builds apart by behaviour)."""
    kind = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "cross", "agent-build-kind.sh")
    done = subprocess.run([kind, binary], capture_output=True, text=True, timeout=120)
    return done.stdout.strip() == "kubernetes"


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: check_containerfile.py CONTAINERFILE CONTEXT_DIR")
    path, context = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        instructions = parse(f.read())
    errors = []
    global_part, all_stages = stages(instructions)
    by_name = {s["name"]: s for s in all_stages if s["name"]}
    global_args = {i.args.split("=")[0] for i in global_part if i.keyword == "ARG"}
    if not all_stages:
        raise SystemExit(f"{path}: no FROM")

    # Every platform resolves to a stage chain that exists.
    for arch in PLATFORMS:
        for stage in all_stages:
            base = expand(stage["base"], {"TARGETARCH": arch})
            if "$" in base:
                errors.append(f"line {stage['from'].line}: FROM {stage['base']} uses an undeclared variable")
            elif "TARGETARCH" in stage["base"] and base not in by_name:
                errors.append(f"line {stage['from'].line}: TARGETARCH={arch} selects stage {base!r}, which does not exist")
    if any("TARGETARCH" in s["base"] for s in all_stages) and "TARGETARCH" not in global_args:
        errors.append("FROM uses TARGETARCH but there is no global `ARG TARGETARCH` before the first FROM")

    # COPY/ADD sources from the build context: binaries cross/build.sh made.
    copied = 0
    for stage in all_stages:
        arch = next((a for a in PLATFORMS if stage["name"] == f"dist-{a}"), None)
        for ins in stage["body"]:
            if ins.keyword == "ADD":
                errors.append(f"line {ins.line}: use COPY, not ADD (no remote or archive magic)")
            if ins.keyword != "COPY" or "from" in ins.flags:
                continue
            words = ins.words()
            if len(words) < 2:
                errors.append(f"line {ins.line}: COPY needs a source and a destination")
                continue
            for source in words[:-1]:
                copied += 1
                full = os.path.join(context, source)
                if not source.startswith("target/dist/"):
                    errors.append(f"line {ins.line}: COPY source {source} is not a cross/build.sh output (target/dist/...)")
                    continue
                if not os.path.isfile(full):
                    errors.append(f"line {ins.line}: {source} does not exist: run cross/build.sh")
                    continue
                desc = subprocess.run(["file", "-b", full], capture_output=True, text=True, check=True).stdout.strip()
                if "static" not in desc or "dynamic" in desc:
                    errors.append(f"line {ins.line}: {source} is not statically linked ({desc})")
                if arch is None:
                    errors.append(f"line {ins.line}: binaries must be copied in a dist-<arch> stage, not {stage['name']!r}")
                elif PLATFORMS[arch] not in desc:
                    errors.append(f"line {ins.line}: stage dist-{arch} copies {source}, which is {desc}")
                elif image_name(words, source) == "edge-agent" and not has_pipeline(full):
                    errors.append(f"line {ins.line}: {source} has no `run --pipeline`: the image needs the agent "
                                  "built with the kubernetes feature (edge-agent-kubernetes), the DaemonSet runs it")
    if copied == 0:
        errors.append("no COPY from the build context: where do the binaries come from?")

    # Stages that run commands do so natively, never under emulation.
    for stage in all_stages:
        if any(i.keyword == "RUN" for i in stage["body"]) and stage["from"].flags.get("platform") != "$BUILDPLATFORM":
            errors.append(f"line {stage['from'].line}: stage {stage['name']} has RUN but no --platform=$BUILDPLATFORM")

    # The final stage: the image people run.
    final = all_stages[-1]
    body = final["body"]
    if final["base"] not in ("scratch",) and not final["base"].startswith("gcr.io/distroless/static"):
        errors.append(f"line {final['from'].line}: final stage FROM {final['base']}: want scratch or distroless/static")
    for ins in body:
        if ins.keyword == "RUN":
            errors.append(f"line {ins.line}: RUN in the final stage (it has no shell)")
        if PACKAGE_MANAGERS.search(ins.args) and ins.keyword in ("RUN", "CMD", "ENTRYPOINT", "ONBUILD"):
            errors.append(f"line {ins.line}: package manager in the final stage: {ins.args}")
        if ins.keyword in ("ENTRYPOINT", "CMD") and ins.exec_form() is None:
            errors.append(f"line {ins.line}: {ins.keyword} must use exec (JSON) form: there is no shell")
    users = [i for i in body if i.keyword == "USER"]
    if not users:
        errors.append("final stage has no USER: it would run as root")
    else:
        user = users[-1].args.strip()
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            errors.append(f"line {users[-1].line}: USER {user}: use a numeric UID[:GID] (runAsNonRoot can only verify numbers)")
        elif int(uid) == 0 or (gid and int(gid) == 0):
            errors.append(f"line {users[-1].line}: USER {user} is root")
    volumes = set()
    for ins in body:
        if ins.keyword == "VOLUME":
            volumes.update(ins.words())
    if BUFFER_VOLUME not in volumes:
        errors.append(f"final stage has no VOLUME {BUFFER_VOLUME} for the agent's buffer")
    entry = [i for i in body if i.keyword == "ENTRYPOINT"]
    if not entry or (entry[-1].exec_form() or [None])[0] != AGENT_PATH:
        errors.append(f"final stage ENTRYPOINT must be [\"{AGENT_PATH}\", ...]")
    binaries = set()
    for ins in body:
        if ins.keyword == "COPY" and ins.flags.get("from") in by_name and by_name[ins.flags["from"]]["base"].startswith("dist-"):
            words = ins.words()
            binaries.update(os.path.basename(w) for w in words[:-1])
    for needed in ("edge-agent", "cloud-ingest"):
        if needed not in binaries:
            errors.append(f"final stage does not copy {needed} from the per-architecture dist stage")

    if errors:
        for e in errors:
            print(f"{path}: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(f"{path}: ok ({len(instructions)} instructions, {len(all_stages)} stages, "
          f"{copied} binaries checked, final stage {final['base']} as USER {users[-1].args})")


if __name__ == "__main__":
    main()
