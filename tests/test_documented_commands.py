"""Every command that the README and the configs' comments document runs as written, with its steps cut.

The commands are read from the docs when the tests are collected, so a newly documented command is covered
without editing this file: the README's fenced ``bash`` blocks, its inline code that starts with a program
(```rlr validate ...```), and comment lines or inline code in ``configs/`` that start with one
(``#   rlr fit --config ...``). Each command is either

* run in a subprocess, in a fresh directory holding a copy of ``configs/`` (so its relative outputs land
  there, never in the repository), with options appended that cut its steps (:func:`shortened`; the CLIs
  take the last value of a repeated option); it must exit with status 0 and the files it says it wrote
  must exist; or
* skipped by name (:data:`SKIPPED`: GPU, hub models, network, installation), with the reason.

A documented command that is neither, e.g. one whose program no rule knows, fails. Commands that read an
earlier command's output (``--lora outputs/quickstart/rlr/version_0/lora``) run in the directory where that
command (:data:`PRODUCERS`) ran once, shortened, for the whole session.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_DIR = ROOT / "configs"

#: Programs a documented command starts with; inline code and comments that start otherwise are prose.
PROGRAMS = frozenset(
    {
        "rlr",
        "python",
        "pip",
        "hf",
        "huggingface-cli",
        "sbatch",
        "srun",
        "torchrun",
        "jupyter",
        "wandb",
        "bash",
    }
)

#: Documented commands not run here, and why. Keys are the commands as written (whitespace collapsed, ``a && b``
#: split in two); a key no longer documented fails ``test_skip_list_holds_only_documented_commands``.
SKIPPED = {
    # Installation and the suite itself: they change or are the environment these tests run in.
    "pip install -e .": "installs the package (the suite runs in the installed package)",
    'pip install -e ".[dev]"': "installs the package with the test tools (the suite runs in them)",
    'pip install -e ".[notebook]"': "installs Jupyter (network)",
    'pip install -e ".[video]"': "installs PyAV (network; the test tools include it)",
    "python -m pytest": "the test suite itself (CI runs exactly this command)",
    "ruff check .": "the style check CI runs before the suite (.ci/run)",
    "ruff format --check .": "the format check CI runs before the suite (.ci/run)",
    "mypy": "the type check CI runs before the suite (.ci/run)",
    "jupyter notebook notebooks/quickstart.ipynb": "starts an interactive server; tests/test_notebook.py executes the notebook",
    # Rebuilds of shipped artifacts, too long for the suite; their parts run in tests/world/.
    "python benchmarks/build_counter.py --out DIR": "rebuilds the packaged counter (about 30 minutes on 2 cores); its sampling, labelling and training run in "
    "tests/world/test_model_samples.py and test_counter.py",
    # Prose: an option named in a sentence, not a command.
    "rlr sample --model": "prose ('`rlr sample --model` draws with it'): names the option, not a command",
    # Network only.
    "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir models/sd15": "downloads Stable Diffusion 1.5 from the Hugging Face Hub (network; the suite is offline)",
    "wandb sync outputs/wandb/wandb/offline-run-*": "uploads an offline run to W&B (network and an account)",
    # Real models: downloaded from the hub (the suite is offline) and sized for a GPU; tests/test_configs.py
    # composes every config through the real CLI, and the tiny models of every family run the same code.
    "rlr sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora outputs/sd15/rlr/version_0/lora "
    '--steps 50 --eta 0.05 --guidance 5 --prompt "a photo of a cat" --device cuda --dtype bfloat16 '
    "--out cat.png": "GPU (--device cuda), Stable Diffusion 1.5 from the hub, and the LoRA of a GPU run",
    "rlr sample --model stabilityai/stable-diffusion-3.5-medium --lora outputs/sd35/rlr/version_0/lora "
    '--steps 40 --eta 0 --guidance 4.5 --resolution 512 --prompt "a photo of a cat" --device cuda '
    "--dtype bfloat16 --out cat.png": "GPU (--device cuda), SD 3.5 Medium from the hub (gated), and the LoRA of a GPU run",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml": "GPU: Stable Diffusion 1.5 and the aesthetic predictor from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/rewards/hpsv2.yaml "
    "--config configs/gpu/24gb.yaml": "GPU (24 GB budget): Stable Diffusion 1.5 and HPSv2 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/gpu/24gb.yaml": "GPU (24 GB budget): Stable Diffusion 1.5 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/gpu/40gb.yaml": "GPU (40 GB budget): Stable Diffusion 1.5 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/gpu/80gb.yaml": "GPU (80 GB budget): Stable Diffusion 1.5 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/estimators/alignprop.yaml": "GPU: Stable Diffusion 1.5 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/estimators/draft.yaml": "GPU: Stable Diffusion 1.5 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/estimators/ddpo.yaml": "GPU: Stable Diffusion 1.5 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/rewards/aesthetic.yaml": "GPU: Stable Diffusion 1.5 and the aesthetic predictor from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/rewards/hpsv2.yaml": "GPU: Stable Diffusion 1.5 and HPSv2 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/rewards/pickscore.yaml": "GPU: Stable Diffusion 1.5 and PickScore from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/wandb.yaml": "GPU: Stable Diffusion 1.5 from the hub, and W&B online (network)",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/wandb.yaml "
    "--config configs/sample_images.yaml": "GPU: Stable Diffusion 1.5 from the hub, and W&B online (network); the overlay is run on CPU with the "
    "quickstart",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/slurm/ddp.yaml": "GPUs (DDP over NCCL): Stable Diffusion 1.5 from the hub",
    "rlr fit --config configs/sd15_aesthetic_rlr.yaml --config configs/slurm/ddp.yaml --trainer.devices 8": "8 GPUs (DDP over NCCL): Stable Diffusion 1.5 from the hub",
    "rlr fit --config configs/flux1_dev_hpsv2_rlr.yaml --config configs/strategies/fsdp.yaml --trainer.devices 4": "4 GPUs (FSDP2 over NCCL): FLUX.1-dev from the hub; tests/test_distributed.py runs the overlay on two CPU processes",
    "sbatch configs/slurm/rlr_multinode.sbatch configs/sd15_aesthetic_rlr.yaml [overlays ...]": "a SLURM cluster with GPUs",
    "sbatch configs/slurm/rlr_multinode.sbatch configs/sd15_aesthetic_rlr.yaml "
    "[configs/estimators/ddpo.yaml ...]": "a SLURM cluster with GPUs",
    "rlr fit --config configs/sdxl_aesthetic_rlr.yaml": "GPU: SDXL base 1.0 at 1024 px from the hub",
    "rlr fit --config configs/sdxl_aesthetic_rlr.yaml --config configs/rewards/hpsv2.yaml "
    "--config configs/estimators/ddpo.yaml": "GPU: SDXL base 1.0 and HPSv2 from the hub",
    "rlr fit --config configs/sd35_medium_pickscore_rlr.yaml": "GPU: SD 3.5 Medium (gated) and PickScore from the hub",
    "rlr fit --config configs/sd35_medium_grpo.yaml": "GPU: SD 3.5 Medium (gated) and PickScore from the hub",
    "rlr fit --config configs/flux1_dev_hpsv2_rlr.yaml": "an 80 GB GPU: FLUX.1-dev (gated) and HPSv2 from the hub",
    "rlr fit --config configs/wan21_1p3b_rlr.yaml": "GPU: Wan 2.1 T2V 1.3B and HPSv2 from the hub",
}

#: Output directories that documented commands read, and the documented command that writes them: it runs
#: once per session, shortened, and the commands that read its output run in its directory after it.
PRODUCERS = {
    "outputs/quickstart/": "rlr fit --config configs/quickstart.yaml",
    "outputs/world_align/": "rlr fit --config configs/world_align.yaml",
    "outputs/video_quickstart/": "rlr fit --config configs/video_quickstart.yaml",
}


@dataclass
class Command:
    text: str  # as written, whitespace collapsed
    sources: list[str]  # file:line of each place it is written
    prose_name: bool = True  # only ever inline code naming a program and its subcommand (`rlr fit`)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def _commands_of_line(line: str) -> list[str]:
    """The commands of one shell line: ``a && b`` is two; a trailing ``# comment`` is not part of them (the
    docs put no `` #`` inside quotes)."""
    line = re.sub(r"(^|\s)#.*$", "", line)
    return [" ".join(part.split()) for part in line.split("&&") if part.strip()]


def _starts_with_program(text: str) -> bool:
    words = text.split()
    return bool(words) and words[0] in PROGRAMS


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`([^`]+)`")


def documented_commands() -> list[Command]:
    """Every command in the README and in the comments of ``configs/``, in order, each once."""
    found: dict[str, Command] = {}

    def add(text: str, source: str, inline: bool) -> None:
        command = found.setdefault(text, Command(text, []))
        command.sources.append(source)
        # `rlr fit` or `python -m rlr_lightning.world.train` in a sentence names a command; the same words in
        # a bash block, or with options, are one to run.
        n_name_words = 3 if text.split()[:2] == ["python", "-m"] else 2
        command.prose_name &= inline and len(text.split()) <= n_name_words

    readme = README.read_text()
    for block in _FENCE.finditer(readme):
        if block.group(1) not in ("bash", "sh", "shell", "console"):
            continue  # e.g. the Python example: code, not commands
        start = _line_of(readme, block.start(2))
        lines = block.group(2).split("\n")
        joined, first = "", None
        for number, line in enumerate(lines, start):
            first = number if first is None else first
            if line.rstrip().endswith("\\"):  # a continued line
                joined += line.rstrip()[:-1] + " "
                continue
            for text in _commands_of_line(joined + line):
                add(text, f"README.md:{first}", inline=False)
            joined, first = "", None
    prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), readme)  # keeps line numbers
    for span in _INLINE.finditer(prose):
        for text in _commands_of_line(" ".join(span.group(1).split())):
            if _starts_with_program(text):
                add(text, f"README.md:{_line_of(prose, span.start())}", inline=True)

    for path in sorted(p for p in CONFIG_DIR.rglob("*") if p.is_file()):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            comment = re.search(r"(?:^|\s)#\s*(.*)$", line)  # a comment line, or a comment after a value
            if comment is None:
                continue
            source = f"{path.relative_to(ROOT)}:{number}"
            body = comment.group(1)
            if line.lstrip().startswith("#") and _starts_with_program(body):
                for text in _commands_of_line(body):  # "#   rlr fit --config ...": the whole comment
                    add(text, source, inline=False)
            else:
                for span in _INLINE.findall(body):
                    for text in _commands_of_line(span):
                        if _starts_with_program(text):
                            add(text, source, inline=True)
    return list(found.values())


#: Cut step counts of ``rlr fit`` / ``rlr validate``: one optimizer step of two images (the fewest the
#: leave-one-out baseline takes) with 3 sampling steps (the fewest RLR's h = 2 block allows). The same for
#: every run, so that ``rlr validate`` gets the model settings its checkpoint was trained with.
LIGHTNING_SHORT = ["--trainer.max_steps", "1", "--data.batch_size", "2", "--model.num_steps", "3"]


def shortened(argv: list[str]) -> tuple[list[str], bool] | None:
    """``argv`` with its step counts cut, and whether the command writes files (it must say where, and they
    must exist); None when no rule knows the command: it then has to be in :data:`SKIPPED`."""
    if argv[:2] in (["rlr", "fit"], ["rlr", "validate"]):
        if any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
            return argv, False  # prints and exits: nothing to cut
        return argv + LIGHTNING_SHORT, argv[1] == "fit"
    if argv[:2] == ["rlr", "sample"]:
        return argv + ["--steps", "2"], True
    if argv[:2] == ["rlr", "diagnose"]:
        return argv + ["--draws", "4", "--batch", "2", "--model.num_steps", "4", "--no-measure"], False
    if argv[:2] == ["rlr", "eval"] or argv[:3] == ["python", "-m", "rlr_lightning.world.evaluate"]:
        return argv + [
            "--samples-per-caption",
            "1",
            "--steps",
            "2",
            "--seeds",
            "0",
        ], "--grid" in argv or "--json" in argv
    if argv[:3] == ["python", "-m", "rlr_lightning.world.motion_evaluate"]:
        return argv + ["--samples-per-caption", "1", "--steps", "2", "--seeds", "0"], "--json" in argv
    if argv[:3] == ["python", "-m", "rlr_lightning.world.counter"]:
        return argv + ["--steps", "2", "--scenes", "8", "--validation-scenes", "8"], True
    return None


#: How the commands say what they wrote: ``Run directory X``, ``... written to X``, ``Exported LoRA weights
#: to X``, ``wrote N bytes of samples to X``, ``counter saved to X``, W&B's ``wandb sync X``.
_ANNOUNCED = re.compile(
    r"(?:Run directory|written to|[Ee]xported [\w ]+? to|wrote \d+ bytes of \w+ to|saved to|wandb sync) (\S+)"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _executable(argv: list[str]) -> list[str]:
    """The documented program from this interpreter's installation (the ``rlr`` script next to it)."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "rlr":
        script = Path(sys.executable).parent / "rlr"
        program = [str(script)] if script.exists() else [sys.executable, "-m", "rlr_lightning"]
        return [*program, *argv[1:]]
    return argv


def _workspace(path: Path) -> Path:
    """A directory laid out like the repository root for the commands: ``configs/`` (copied)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(CONFIG_DIR, path / "configs")
    return path


@dataclass
class Ran:
    command: Command
    argv: list[str]
    cwd: Path
    returncode: int
    output: str  # stdout and stderr, without colour codes

    def report(self) -> str:
        return (
            f"`{self.command.text}` (documented at {', '.join(self.command.sources)}) run as\n  "
            f"{shlex.join(self.argv)}\nin {self.cwd} exited with {self.returncode}; its output ends:\n"
            f"{self.output[-4000:]}"
        )


def _run(command: Command, argv: list[str], cwd: Path) -> Ran:
    # The environment is the suite's (offline: HF_HUB_OFFLINE=1, set in conftest.py).
    proc = subprocess.run(
        _executable(argv), cwd=cwd, capture_output=True, text=True, timeout=900, env=dict(os.environ)
    )
    return Ran(command, argv, cwd, proc.returncode, _ANSI.sub("", proc.stdout + proc.stderr))


COMMANDS = documented_commands()
_BY_TEXT = {c.text: c for c in COMMANDS}


def _producer(argv: list[str]) -> str | None:
    """The documented command whose output ``argv`` reads, if any."""
    for prefix, producer in PRODUCERS.items():
        if any(a.startswith(prefix) for a in argv):
            return producer
    return None


@pytest.fixture(scope="session")
def produced(tmp_path_factory):
    """Runs each producer command once, shortened, when a test first needs it: ``produced(text)`` is the run."""
    runs: dict[str, Ran] = {}

    def get(text: str) -> Ran:
        if text not in runs:
            assert text in _BY_TEXT, f"PRODUCERS names `{text}`, which no longer is documented"
            argv, _ = shortened(_BY_TEXT[text].argv)
            runs[text] = _run(_BY_TEXT[text], argv, _workspace(tmp_path_factory.mktemp("documented")))
        return runs[text]

    return get


def _check(ran: Ran, writes_files: bool) -> None:
    assert ran.returncode == 0, ran.report()
    if not writes_files:
        return
    announced = [p.rstrip(".,;:)") for p in _ANNOUNCED.findall(ran.output)]
    assert announced, "the command wrote files but did not say where\n" + ran.report()
    for path in announced:
        assert (ran.cwd / path).exists(), f"it said it wrote {path}, which does not exist\n" + ran.report()


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c.text for c in COMMANDS])
def test_documented_command_runs(command: Command, tmp_path, produced):
    if command.text in SKIPPED:
        pytest.skip(f"not run here: {SKIPPED[command.text]}")
    if command.prose_name:
        pytest.skip("names a command in a sentence; its documented uses with options are run")
    short = shortened(command.argv)
    if short is None:
        pytest.fail(
            f"`{command.text}` (documented at {', '.join(command.sources)}) is neither run nor "
            "skipped: add a rule to shortened() that runs it cheaply, or an entry with the reason to "
            "SKIPPED"
        )
    argv, writes_files = short
    if command.text in PRODUCERS.values():
        ran = produced(command.text)  # the same run the commands reading its output use
    elif (producer := _producer(argv)) is not None:
        first = produced(producer)
        assert first.returncode == 0, "the command that writes this one's input failed:\n" + first.report()
        ran = _run(command, argv, first.cwd)
    else:
        ran = _run(command, argv, _workspace(tmp_path))
    _check(ran, writes_files)
    if argv[:2] == ["rlr", "validate"]:
        # The README promises these metrics from rlr validate.
        for metric in ("val/reward_mean", "val/reward_std", "val/diversity"):
            assert metric in ran.output, f"rlr validate printed no {metric}\n" + ran.report()


def test_skip_list_holds_only_documented_commands():
    """A skip entry whose command was edited or removed from the docs would hide nothing; drop or fix it."""
    stale = sorted(set(SKIPPED) - set(_BY_TEXT))
    assert not stale, f"SKIPPED names commands no longer documented: {stale}"
    assert set(PRODUCERS.values()) <= set(_BY_TEXT), "PRODUCERS names a command no longer documented"
