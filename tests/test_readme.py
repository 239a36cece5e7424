"""The README's commands cannot drift from the code.

Every ```bash block of README.md is parsed into command lines (continuations joined, comments dropped).
For each `mmtok ...` line (also `python -m mmtok.train`, `deepspeed --module mmtok.train`, `torchrun -m
mmtok.train`): the subcommand (and `eval` target, `shards` builder, `list` kind) exists, every `--option`
is one that subcommand's `--help` lists, `shards` keys are the builder's options, and `train` configs load
with their overrides. `python tools/X.py --opt` lines: the script exists and defines the option.

Blocks preceded by the marker `<!-- test -->` are also checked for data flow: every input path they name
(`--model`, `--image`, `--data`, ...) is made by `make demo` (the quickstart's outputs) or by an earlier
command of the README. The slow test then executes the marked blocks, in order, in a temporary folder after
a `tools/quickstart.py --tiny` run, with tiny overrides appended (2-second training budgets, a few samples).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = "<!-- test -->"
sys.path.insert(0, str(ROOT / "tools"))

import quickstart  # noqa: E402  (tools/quickstart.py: its STEPS say what `make demo` leaves behind)


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    marked: bool


def readme_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text, with whether the marker line precedes the fence."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        blocks.append(Block(start + 1, m.group(1), "\n".join(body), prev == MARK))
        i += 1
    return blocks


def command_lines(body: str) -> list[list[str]]:
    """Shell words of each command in a bash block (continuations joined, `#` comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def mmtok_argv(words: list[str]) -> list[str] | None:
    """The arguments after `mmtok` of a command line, or None when the line does not run mmtok."""
    while words and re.match(r"^[A-Z_]+=", words[0]):  # leading environment assignments
        words = words[1:]
    if not words:
        return None
    if Path(words[0]).name == "mmtok":
        return words[1:]
    for flag in ("-m", "--module"):
        if flag in words:
            k = words.index(flag)
            if k + 1 < len(words) and words[k + 1] in ("mmtok", "mmtok.train"):
                rest = words[k + 2 :]
                return rest if words[k + 1] == "mmtok" else ["train", *rest]
    return None


def _help(argv: list[str]) -> str:
    """What `mmtok ARGV` prints (in this process: argparse help exits with SystemExit)."""
    from mmtok.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(list(argv))
        except SystemExit:
            pass
    return buf.getvalue()


def _has_option(help_text: str, opt: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_text) is not None


def check_mmtok(argv: list[str]) -> list[str]:
    """Problems with one `mmtok` command line (empty = fine). Nothing is run except `--help` parsers."""
    from mmtok.cli.main import SUBCOMMANDS

    if not argv or argv[0] in ("--help", "-h", "--version"):
        return []
    sub, rest = argv[0], argv[1:]
    if sub not in SUBCOMMANDS:
        return [f"unknown subcommand {sub!r} (mmtok has {sorted(SUBCOMMANDS)})"]
    prefix = [sub]
    if sub == "eval":
        if not rest:
            return []
        target = rest[0]
        if target.startswith("-"):
            return []
        if not _has_option(_help(["eval", "--help"]), target):
            return [f"mmtok eval has no target {target!r}"]
        prefix, rest = ["eval", target], rest[1:]
    problems = []
    if sub == "shards" and rest and not rest[0].startswith("-"):
        name = rest[0]
        if name.isupper():  # a placeholder such as NAME
            return []
        opts = _help(["shards", name, "--help-options"])
        if not opts.strip():
            return [f"mmtok shards has no builder {name!r}"]
        keys = {line.split("=")[0].strip() for line in opts.splitlines() if "=" in line}
        for w in rest[1:]:
            if "=" in w and not w.startswith("-") and w.split("=")[0] not in keys:
                problems.append(f"mmtok shards {name}: no option {w.split('=')[0]!r} (it has {sorted(keys)})")
        rest = [w for w in rest[1:] if w.startswith("--")]
    if sub == "list":
        return []
    help_text = _help([*prefix, "--help"])
    for w in rest:
        if w.startswith("--") and len(w) > 2:
            opt = w.split("=")[0]
            if opt != "--help-options" and not _has_option(help_text, opt):
                problems.append(f"mmtok {' '.join(prefix)} has no option {opt}")
    if sub == "train":
        from mmtok.train.config import load_run_config

        files = [rest[k + 1] for k, w in enumerate(rest) if w == "--config" and k + 1 < len(rest)]
        overrides = [w for w in rest if "=" in w and not w.startswith("-")]
        missing = [f for f in files if not (ROOT / f).is_file()]
        if missing:
            problems.append(f"config files missing: {missing}")
        else:
            try:
                load_run_config([ROOT / f for f in files], overrides)
            except Exception as e:  # ConfigError and what the task's own validation raises
                problems.append(f"mmtok train {' '.join(rest)}: {type(e).__name__}: {e}")
    return problems


def check_script(words: list[str]) -> list[str]:
    """`python tools/X.py --opt ...` or `tools/X.sh ...`: the script exists and defines every option."""
    script = next((w for w in words if w.startswith("tools/")), None)
    if script is None:
        return []
    path = ROOT / script
    if not path.is_file():
        return [f"{script} does not exist"]
    src = path.read_text()
    return [
        f"{script} defines no option {w.split('=')[0]}"
        for w in words[words.index(script) + 1 :]
        if w.startswith("--") and f'"{w.split("=")[0]}"' not in src
    ]


# ---------------------------------------------------------------------------------------- data flow

INPUT_OPTIONS = ("--model", "--tokenizer", "--run", "--image", "--data", "--codes", "--video-train", "--video-test")
OUTPUT_OPTIONS = ("--out", "--json", "--md", "--grid", "--figure")


def quickstart_outputs() -> set[str]:
    """Paths `make demo` leaves behind (relative to the repo root)."""
    out = {quickstart.Q, f"{quickstart.Q}/scene.png", f"{quickstart.Q}/scene64.png", f"{quickstart.Q}/REPORT.md"}
    for step in quickstart.STEPS:
        out |= set(_outputs(step.argv))
        if step.done:
            out.add(step.done)
    return out


def _outputs(argv: list[str]) -> list[str]:
    found = []
    for k, w in enumerate(argv[:-1]):
        if w in OUTPUT_OPTIONS:
            found.append(argv[k + 1])
    found += [w.split("=", 1)[1] for w in argv if w.startswith("output_dir=")]
    if argv and argv[0] == "train" and not any(w.startswith("output_dir=") for w in argv):
        import yaml

        for k, w in enumerate(argv):
            if w == "--config" and k + 1 < len(argv) and (ROOT / argv[k + 1]).is_file():
                od = (yaml.safe_load((ROOT / argv[k + 1]).read_text()) or {}).get("output_dir")
                if od:
                    found.append(od)  # later files win: the last one is the run folder
        found = found[-1:] if found else found
    return found


def _covered(path: str, made: set[str]) -> bool:
    """True when ``path`` (a file, folder or shard pattern) exists in the repo or lies in/under something made."""
    if "*" in path:
        path = str(Path(path).parent)
    path = path.rstrip("/")
    if (ROOT / path).exists() and not path.startswith(("runs", "data")):
        return True
    return any(path == m or path.startswith(m + "/") or m.startswith(path + "/") for m in made)


def _looks_like_path(value: str) -> bool:
    """A folder, file or shard pattern rather than a keyword such as ``--data fmnist``."""
    return "/" in value or "*" in value or Path(value).suffix.lower() in (".png", ".jpg", ".jpeg", ".tar", ".json")


def dataflow_problems(blocks: list[Block]) -> list[str]:
    made = quickstart_outputs()
    problems = []
    for b in blocks:
        if b.lang != "bash":
            continue
        for words in command_lines(b.body):
            argv = mmtok_argv(words)
            if argv is None:
                continue
            if b.marked:
                for k, w in enumerate(argv[:-1]):
                    if w in INPUT_OPTIONS and _looks_like_path(argv[k + 1]) and not _covered(argv[k + 1], made):
                        problems.append(
                            f"README line {b.line}: `mmtok {shlex.join(argv)}` reads {argv[k + 1]}, which neither "
                            "`make demo` nor an earlier README command makes"
                        )
            made |= set(_outputs(argv))
    return problems


# --------------------------------------------------------------------------------------------- tests


def test_block_parser_on_a_known_text():
    text = "intro\n\n<!-- test -->\n```bash\nmmtok eval seg --model m \\\n   --data 'a b' # c\n```\n```\nx\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.marked, b.line) for b in blocks] == [("bash", True, 4), ("", False, 8)]
    assert command_lines(blocks[0].body) == [["mmtok", "eval", "seg", "--model", "m", "--data", "a b"]]
    assert mmtok_argv(["DS_ACCELERATOR=cpu", "torchrun", "-m", "mmtok.train", "--config", "x"]) == [
        "train",
        "--config",
        "x",
    ]
    assert mmtok_argv(["python", "tools/quickstart.py"]) is None


def test_checker_finds_a_wrong_command():
    """The checks can fail: a made-up option, target, builder key and config key are each reported."""
    assert check_mmtok(["prune", "--model", "m", "--no-such-flag"]) == ["mmtok prune has no option --no-such-flag"]
    assert check_mmtok(["eval", "nothing"]) == ["mmtok eval has no target 'nothing'"]
    assert check_mmtok(["shards", "fashion-scenes", "--out", "d", "canvs=64"])
    assert check_mmtok(["train", "--config", "configs/toy/fmnist_classifier.yaml", "train.stepz=3"])
    assert check_mmtok(["segment", "--model", "m", "--image", "i", "--expression", "e"]) == []


def test_every_readme_command_exists_with_its_options():
    blocks = readme_blocks(README.read_text())
    problems, seen = [], 0
    for b in blocks:
        if b.lang != "bash":
            continue
        for words in command_lines(b.body):
            argv = mmtok_argv(words)
            if argv is not None:
                seen += 1
                problems += [f"README line {b.line}: {p}" for p in check_mmtok(argv)]
            else:
                problems += [f"README line {b.line}: {p}" for p in check_script(words)]
    assert seen >= 10, "the README should show the mmtok commands"
    assert not problems, "\n".join(problems)


def test_marked_blocks_read_only_what_make_demo_or_earlier_commands_make():
    assert not dataflow_problems(readme_blocks(README.read_text()))


def test_dataflow_check_flags_a_path_nothing_makes():
    text = f"{MARK}\n```bash\nmmtok prune --model runs/nowhere/export --image scene.png --prompt hi\n```\n"
    problems = dataflow_problems(readme_blocks(text))
    assert len(problems) == 2 and "runs/nowhere/export" in problems[0] and "scene.png" in problems[1]
    q = "runs/quickstart"
    ok = f"{MARK}\n```bash\nmmtok prune --model {q}/mllm_fashion_vqa/export --image {q}/scene.png --prompt hi\n```\n"
    assert dataflow_problems(readme_blocks(ok)) == []


# Appended to each executed command so that it runs in seconds (later arguments win in argparse and configs).
TINY_ARGS = {
    "train": ["train.max_seconds=2", "train.schedule_by_time=true", "data.batch_size=4", "data.num_workers=0"],
    "eval tokenizer": ["--n", "16", "--no-fid", "--bpe-merges", "8", "--bpe-train-n", "32"],
    "eval mim": ["--limit-train", "200", "--limit-test", "100", "--finetune-budget", "2"],
    "eval mllm": ["--limit", "4"],
    "eval seg": ["--limit", "2"],
    "prune": ["--repeats", "1", "--max-new-tokens", "4"],
}


@pytest.mark.slow
def test_marked_blocks_run_after_a_tiny_quickstart(tmp_path):
    """`make demo` (tiny) in a temporary folder, then every marked block's commands as written (+ TINY_ARGS)."""
    marked = [b for b in readme_blocks(README.read_text()) if b.marked and b.lang == "bash"]
    if not marked:
        pytest.skip("no README block is marked with <!-- test --> yet")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    qs = [sys.executable, str(ROOT / "tools/quickstart.py"), "--tiny", "--root", str(tmp_path)]
    r = subprocess.run(qs, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    shards = {k: v for k, v in quickstart.TINY_SHARDS.items()}
    for b in marked:
        for words in command_lines(b.body):
            argv = mmtok_argv(words)
            if argv is None or argv[0] in ("demo", "bench"):
                continue  # servers and benchmarks are tested elsewhere
            key = " ".join(argv[:2]) if argv[0] == "eval" else argv[0]
            extra = TINY_ARGS.get(key, [])
            if argv[0] == "shards" and len(argv) > 1:
                extra = shards.get(argv[1], [])
            res = subprocess.run(
                [sys.executable, "-m", "mmtok", *argv, *extra], cwd=tmp_path, env=env, capture_output=True, text=True
            )
            assert res.returncode == 0, f"README line {b.line}: mmtok {shlex.join(argv)}\n{res.stderr[-3000:]}"
