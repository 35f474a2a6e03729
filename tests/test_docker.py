"""The container files, checked without a Docker engine: docker/Dockerfile, docker/dist_kp.def, .dockerignore."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from packaging.requirements import Requirement
from packaging.version import Version

from dist_kp.distributed.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DEFINITION = REPO / "docker" / "dist_kp.def"
DOCKERIGNORE = REPO / ".dockerignore"
KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
            "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
SECRET_NAME = re.compile(r"SECRET|PASSW|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE|CREDENTIAL|AUTH", re.IGNORECASE)
SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|ghp_[0-9A-Za-z]{20,}|hf_[0-9A-Za-z]{20,}|[0-9a-f]{40}")


@dataclass
class Instruction:
    keyword: str
    flags: list[str]
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, `\\` continuations joined, --flags split off."""
    instructions, pending, start = [], None, 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:  # comments and blank lines, also inside continuations
            continue
        if pending is None:
            pending, start = "", number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        pending += stripped
        keyword, _, rest = pending.partition(" ")
        if keyword.upper() not in KEYWORDS:
            raise ValueError(f"line {start}: unknown instruction {keyword!r}")
        flags = []
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.lstrip()
        if not rest.strip():
            raise ValueError(f"line {start}: {keyword} without arguments")
        instructions.append(Instruction(keyword.upper(), flags, rest.strip(), start))
        pending = None
    if pending is not None:
        raise ValueError(f"line {start}: the file ends inside a line continuation")
    return instructions


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of CMD/ENTRYPOINT/SHELL; shell form or broken JSON is refused (signals would not reach it)."""
    value = json.loads(instruction.args)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"line {instruction.line}: {instruction.keyword} must be a JSON array of strings")
    return value


def key_values(instruction: Instruction) -> dict[str, str]:
    """ENV/LABEL/ARG pairs (KEY=VALUE form, or the legacy `ENV KEY VALUE`)."""
    tokens = shlex.split(instruction.args)
    if instruction.keyword == "ARG":
        return dict((t.split("=", 1) + [""])[:2] for t in tokens)
    if all("=" in t for t in tokens):
        return dict(t.split("=", 1) for t in tokens)
    return {tokens[0]: " ".join(tokens[1:])}


def by_keyword(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in by_keyword(instructions, "ENV"):
        env.update(key_values(instruction))
    return env


def pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a shell command line (quotes and operators respected)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    found = []
    for words in [*commands, current]:
        for i in range(len(words) - 1):
            if words[i] == "pip" and words[i + 1] == "install":
                found.append(words[i + 2:])
    return found


def positional(args: list[str]) -> list[str]:
    """pip install targets: arguments that are not options or option values."""
    takes_value = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url", "-t",
                   "--target", "--prefix", "--root", "-f", "--find-links"}
    targets, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-"):
            targets.append(arg)
    return targets


def base_image(reference: str) -> tuple[str, str]:
    name, _, tag = reference.partition("@")[0].rpartition(":")
    return name, tag


def definition_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """An Apptainer definition: its header (Bootstrap, From) and its %sections' lines."""
    header, sections, current = {}, {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections[current] = []
        elif current is None:
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, sections


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        regex = re.escape(body.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_parser_joins_continuations_and_refuses_what_docker_would_not_build() -> None:
    parsed = parse_dockerfile("# syntax=docker/dockerfile:1\nFROM a:1\nRUN --mount=type=cache,target=/c echo 1 \\\n"
                              "    # a comment inside\n    && echo 2\nCMD [\"python\"]\n")
    assert [(i.keyword, i.flags, i.args) for i in parsed] == [
        ("FROM", [], "a:1"), ("RUN", ["--mount=type=cache,target=/c"], "echo 1 && echo 2"), ("CMD", [], '["python"]')]
    for broken in ("FROM a:1\nRUNN echo\n", "FROM a:1\nRUN echo \\\n", "FROM a:1\nCOPY\n"):
        with pytest.raises(ValueError):
            parse_dockerfile(broken)
    with pytest.raises(ValueError):
        exec_form(Instruction("CMD", [], "python -m dist_kp.train", 1))


def test_one_stage_from_the_official_pytorch_cuda_runtime_image_of_the_tested_torch(
        dockerfile: list[Instruction], pyproject: dict) -> None:
    assert dockerfile[0].keyword == "FROM" and len(by_keyword(dockerfile, "FROM")) == 1
    name, tag = base_image(dockerfile[0].args)
    assert name == "pytorch/pytorch", "the official PyTorch image"
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", tag)
    assert match, f"tag {tag!r} is not pinned as VERSION-cudaX.Y-cudnnN-runtime (no 'latest', no floating tag)"
    image_torch = Version(match.group(1))
    torch_requirement = next(Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert image_torch in torch_requirement.specifier, f"image torch {image_torch} outside {torch_requirement}"
    assert image_torch == Version(torch.__version__.split("+")[0]), "the image runs the torch the tests run on"


def test_the_project_is_installed_with_every_runtime_dependency_and_not_the_dev_extra(
        dockerfile: list[Instruction], pyproject: dict) -> None:
    installs = [(i, args) for i in by_keyword(dockerfile, "RUN") for args in pip_installs(i.args)]
    copied = {}
    for copy in by_keyword(dockerfile, "COPY"):
        *sources, destination = shlex.split(copy.args)
        for source in sources:
            copied[source] = destination if not destination.endswith("/") else destination + source
    project = [(i, args) for i, args in installs if any(
        t.rstrip("/") == copied.get("pyproject.toml", "").rpartition("/")[0] for t in positional(args))]
    assert len(project) == 1, f"expected one `pip install <project dir>` of the copied pyproject.toml: {installs}"
    run, args = project[0]
    assert "--no-deps" not in args, "pip must install the dependencies of pyproject.toml"
    assert not any("[" in t for t in positional(args)), "extras (dev) are not for the runtime image"
    project_dir = positional(args)[0].rstrip("/")
    for folder in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        for path in REPO.glob(folder.rstrip("*")):
            assert copied.get(path.name) == f"{project_dir}/{path.name}", f"{path.name}/ is not beside pyproject.toml"
    assert copied.get(pyproject["project"]["readme"]) == f"{project_dir}/README.md", \
        "setuptools needs the readme named in pyproject.toml"
    assert all(copy.line < run.line for copy in by_keyword(dockerfile, "COPY")
               if any(s in shlex.split(copy.args)[:-1] for s in ("pyproject.toml", "dist_kp")))

    # Nothing else installs a dependency outside the range pyproject.toml allows (shadowing it).
    requirements = {Requirement(d).name.lower(): Requirement(d) for d in pyproject["project"]["dependencies"]}
    for _, other in installs:
        for target in positional(other):
            if target.startswith(("/", ".")):
                continue  # a folder: the project itself
            pinned = Requirement(target)
            allowed = requirements.get(pinned.name.lower())
            assert allowed is not None, f"{target} is not a dependency of the project"
            for spec in pinned.specifier:
                assert allowed.specifier.contains(spec.version, prereleases=True), f"{target} shadows {allowed}"
    constraint = re.search(r"grep -E '\^\((?P<names>[\w|]+)\)=='", run.args)
    assert constraint and set(constraint["names"].split("|")) == {"torch", "torchvision"}, \
        "torch and torchvision stay the base image's CUDA builds"
    constraint_file = args[args.index("--constraint") + 1]
    assert f"> {constraint_file}" in run.args, "the constraint file is the base image's own torch and torchvision"
    image_vision = Version(torchvision.__version__.split("+")[0])
    assert image_vision in requirements["torchvision"].specifier


def test_the_default_command_is_a_module_of_this_project_and_nothing_wraps_commands(
        dockerfile: list[Instruction]) -> None:
    assert not by_keyword(dockerfile, "ENTRYPOINT"), "srun/pyxis, torchrun and apptainer run the given command as is"
    command = exec_form(by_keyword(dockerfile, "CMD")[-1])
    assert command[:2] == ["python", "-m"]
    module = command[2]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"CMD runs {module}, which does not exist"


def test_runs_as_a_non_root_user_that_the_image_creates(dockerfile: list[Instruction]) -> None:
    user = by_keyword(dockerfile, "USER")[-1]
    assert dockerfile.index(user) > max(dockerfile.index(i) for i in by_keyword(dockerfile, "RUN"))
    uid = user.args.split(":")[0]
    assert uid not in ("root", "0")
    created = [i for i in by_keyword(dockerfile, "RUN") if "useradd" in i.args]
    assert created and re.search(rf"--uid {uid}\b", created[-1].args), f"USER {uid} is not created by useradd"


def test_no_secret_is_baked_in_and_nccl_and_omp_have_defaults(dockerfile: list[Instruction]) -> None:
    for instruction in by_keyword(dockerfile, "ENV") + by_keyword(dockerfile, "ARG"):
        for name, value in key_values(instruction).items():
            assert not SECRET_NAME.search(name), f"line {instruction.line}: {name} looks like a secret"
            assert not SECRET_VALUE.search(value), f"line {instruction.line}: the value of {name} looks like a key"
    for copy in by_keyword(dockerfile, "COPY") + by_keyword(dockerfile, "ADD"):
        sources = shlex.split(copy.args)[:-1]
        assert not any(s in (".", "./") or s.startswith((".env", ".aws", ".netrc", "~")) for s in sources), copy
    env = image_env(dockerfile)
    assert env["NCCL_DEBUG"] in ("WARN", "INFO") and int(env["OMP_NUM_THREADS"]) >= 1
    assert env.get("PYTHONUNBUFFERED") == "1", "log lines reach srun's output as they happen"


def test_dockerignore_lets_in_only_what_the_image_needs() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "README.md", "configs/synthetic_cpu.yaml", "dist_kp/predict.py",
              "dist_kp/data/coco.py"]
    for path in needed:
        assert (REPO / path).exists() and not dockerignored(path, patterns), f"{path} is needed by the build"
    for path in (".env", "docker/.env", ".aws/credentials", ".netrc", "key.pem", ".venv/bin/python", ".git/config",
                 "runs/demo/model_final.pt", "data/coco/train2017/1.jpg", "wandb/settings", "tests/conftest.py",
                 "dist_kp/__pycache__/train.cpython-311.pyc", "shared/notes.md",
                 "launch/demo.sh"):
        assert dockerignored(path, patterns), f"{path} would enter the build context"


def test_apptainer_definition_bootstraps_from_the_same_image_with_the_same_install_and_defaults(
        dockerfile: list[Instruction]) -> None:
    header, sections = definition_sections(DEFINITION.read_text())
    assert header == {"Bootstrap": "docker", "From": dockerfile[0].args}
    post = " && ".join(sections["post"])
    docker_run = next(i.args for i in by_keyword(dockerfile, "RUN") if pip_installs(i.args))
    assert [positional(a) for a in pip_installs(post)] == [positional(a) for a in pip_installs(docker_run)]
    assert "--no-deps" not in post
    copied = {line.split()[0] for line in sections["files"]}
    assert {"pyproject.toml", "README.md", "dist_kp", "configs"} <= copied
    exported = {}
    for line in sections["environment"]:
        name, _, value = line.removeprefix("export ").partition("=")
        exported[name] = re.sub(rf"^\$\{{{name}:-(.*)\}}$", r"\1", value)  # ${NAME:-default}: the host may override
    assert exported == image_env(dockerfile)
    assert all(not SECRET_NAME.search(name) for name in exported)


def test_the_container_docs_batch_script_is_valid_bash_requeues_on_preemption_and_names_real_configs(
        tmp_path: Path) -> None:
    text = (REPO / "docker" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    script = next(b for b in blocks if b.startswith("#!/bin/bash"))
    (tmp_path / "train_container.sh").write_text(script)
    checked = subprocess.run(["bash", "-n", str(tmp_path / "train_container.sh")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script
    assert f'if [ "$status" -eq {EXIT_PREEMPTED} ]; then\n    scontrol requeue "$SLURM_JOB_ID"' in script, \
        "the batch shell requeues when the workers exit as preempted (no scontrol inside the image)"
    for config in set(re.findall(r"/opt/dist_kp/(configs/[\w./-]+\.yaml)", text)):
        assert (REPO / config).is_file(), f"docker/README.md names {config}, which the image does not hold"
