"""`blockdiff eval`: the shipped tasks, the sandbox, scoring, and one end-to-end CLI run."""
from __future__ import annotations

import json
import os
import re
import sysconfig
from pathlib import Path

import pytest

from blockdiff.evaluation.runner import configurations
from blockdiff.evaluation.sandbox import SandboxLimits, run_program, run_programs
from blockdiff.evaluation.scoring import (code_program, exact_match, normalize_answer, qa_answer,
                                          reference_program, truncate_code)
from blockdiff.evaluation.tasks import TASK_DIR, CodeTask, fewshot_prefix, load_tasks, model_prompt

CODE = [t for t in load_tasks(["code"])]
QA = load_tasks(["qa"])
FAST = SandboxLimits(timeout_s=3.0)


# --- the task set ---

def test_task_ids_unique_and_well_formed():
    ids = [t.task_id for t in CODE + QA]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"code/\d{3}", t.task_id) for t in CODE)
    assert all(re.fullmatch(r"qa/\d{3}", t.task_id) for t in QA)
    assert 30 <= len(CODE) <= 40 and 40 <= len(QA) <= 60
    assert len({t.entry_point for t in CODE}) == len(CODE)
    for t in CODE:
        assert t.prompt.startswith(f"def {t.entry_point}(") and t.prompt.endswith('"""\n')
        assert "def check(candidate):" in t.test
    assert all(t.question.strip() and t.answers and all(a.strip() for a in t.answers) for t in QA)
    assert (TASK_DIR / "README.md").is_file()


def _fewshot_names() -> list[str]:
    return re.findall(r"^def (\w+)\(", fewshot_prefix("code"), flags=re.M)


def test_code_tasks_are_held_out_from_the_stdlib():
    """models/tiny was trained on the stdlib source: no task function may be defined there."""
    names = [t.entry_point for t in CODE] + _fewshot_names()
    assert len(_fewshot_names()) == 2
    pattern = re.compile(r"\bdef\s+(" + "|".join(map(re.escape, names)) + r")\s*\(")
    root = Path(sysconfig.get_paths()["stdlib"])
    hits, scanned = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        # installed third-party packages are not the stdlib (nor in the training data)
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                scanned += 1
                text = (Path(dirpath) / name).read_text(encoding="utf-8", errors="replace")
                hits += [(m.group(1), name) for m in pattern.finditer(text)]
    assert scanned > 500, f"found only {scanned} .py files under {root}"
    assert hits == []


def test_every_reference_solution_passes_and_a_wrong_one_fails():
    refs = run_programs([reference_program(t) for t in CODE], FAST, workers=4)
    assert [t.task_id for t, r in zip(CODE, refs) if not r.passed] == []
    wrong = run_programs([code_program(t, "\n    return None\n") for t in CODE], FAST, workers=4)
    assert [t.task_id for t, r in zip(CODE, wrong) if r.passed] == []


def test_fewshot_code_prefix_is_itself_correct_python():
    compile(fewshot_prefix("code"), "fewshot", "exec")
    assert fewshot_prefix("qa").count("Q: ") == fewshot_prefix("qa").count("A: ") >= 2


# --- the sandbox ---

@pytest.mark.parametrize("source, status", [
    ("while True:\n    pass\n", "timeout"),
    ("raise ValueError('boom')\n", "failed"),
    ("import sys\nsys.exit(0)\n", "failed"),
    ("import os\nos._exit(0)\n", "failed"),
    ("x = bytearray(8 << 30)\n", "failed"),
    ("while True:\n    print('x' * 100000)\n", "failed"),
    ("import os\nos.kill(os.getpid(), 9)\n", "failed"),
])
def test_sandbox_failure_modes_are_failures(source, status):
    result = run_program(source, SandboxLimits(timeout_s=2.0))
    assert not result.passed and result.status == status
    assert len(result.stderr_tail) <= 2000


def test_sandbox_passes_a_good_program_and_hides_the_environment(monkeypatch):
    monkeypatch.setenv("BLOCKDIFF_SECRET_TOKEN", "hunter2")
    ok = run_program("import os\nassert 'BLOCKDIFF_SECRET_TOKEN' not in os.environ\nprint('hi')\n", FAST)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0


def test_sandbox_exit_before_the_tests_is_not_a_pass():
    task = CODE[0]
    body = "\n    return a + b\nimport sys\nsys.exit(0)\n"  # correct body, but the tests never run
    assert not run_program(code_program(task, body), FAST).passed


def test_many_programs_in_parallel_keep_their_own_verdicts():
    sources = ["assert 1 == 1\n", "assert 1 == 2\n", "while True: pass\n", "print(1)\n"]
    results = run_programs(sources, SandboxLimits(timeout_s=2.0), workers=3)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "passed"]


# --- scoring ---

def test_normalize_answer_like_squad():
    assert normalize_answer("  The Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("A cat.") == "cat"
    assert normalize_answer("an apple and THE pear") == "apple and pear"
    assert normalize_answer("Theatre") == "theatre"  # 'the' only as a whole word


def test_exact_match_with_aliases_and_first_line():
    assert exact_match("Paris.", ["Paris"])
    assert exact_match("the Pacific Ocean", ["Pacific", "Pacific Ocean"])
    assert not exact_match("Paris, France", ["Paris"])
    assert not exact_match("", ["Paris"])
    assert qa_answer(" Tokyo\nQ: next question") == "Tokyo"


def test_truncate_code_at_the_end_of_the_function():
    body = "\n    x = 1\n\n    return x\n\n\ndef another():\n    pass\n"
    assert truncate_code(body) == "\n    x = 1\n\n    return x\n"
    assert truncate_code("\n    return 1\nprint(f(2))\n") == "\n    return 1\n"
    assert truncate_code("\n    return 1\n```\nThis function") == "\n    return 1\n"
    assert truncate_code("\n    return 1\nx = 5\n") == "\n    return 1\n"  # any top-level line
    assert truncate_code("\n    return 1\nif __name__ == '__main__':\n    main()") == "\n    return 1\n"
    assert truncate_code("\n    return 1\n#comment\n") == "\n    return 1\n"
    assert truncate_code("\n    return 1") == "\n    return 1\n"
    assert truncate_code("") == "\n"


def test_model_prompt_drops_the_trailing_newline_and_programs_compile():
    task = CODE[0]
    prompt = model_prompt(task, "PREFIX\n")
    assert prompt.startswith("PREFIX\ndef ") and prompt.endswith('"""')
    compile(reference_program(task), "program", "exec")
    assert model_prompt(QA[0], "").endswith(f"Q: {QA[0].question}\nA:")


def test_configurations_one_per_mode_and_per_diffusion_threshold():
    configs = configurations(["ar", "diffusion", "quad_spec"], [0.5, 0.9], 32, 8)
    assert [(c.mode, c.block_length, c.threshold) for c in configs] == [
        ("ar", 32, 0.9), ("diffusion", 32, 0.5), ("diffusion", 32, 0.9), ("quad_spec", 8, 0.9)]


def test_load_tasks_limit_and_unknown_kind():
    assert [t.kind for t in load_tasks(["code", "qa"], limit=2)] == ["code", "code", "qa", "qa"]
    assert isinstance(load_tasks(["code"], limit=1)[0], CodeTask)
    with pytest.raises(ValueError):
        load_tasks(["math"])


# --- end to end ---

def test_cli_bad_mode_fails_before_loading(capsys):
    from blockdiff.cli import main
    assert main(["eval", "--model", "/nonexistent", "--modes", "nope", "--limit", "1"]) == 2
    assert "mode" in capsys.readouterr().err


@pytest.mark.skipif(not (Path(__file__).parents[1] / "models" / "tiny" / "config.json").is_file(),
                    reason="models/tiny is not in this checkout")
def test_cli_end_to_end_on_tiny(tmp_path, capsys):
    from blockdiff.cli import main
    out = tmp_path / "eval"
    rc = main(["eval", "--model", "tiny", "--dtype", "float32", "--limit", "2", "--modes", "ar,diffusion",
               "--thresholds", "0.5,0.9", "--block-length", "8", "--max-new-tokens", "8", "--out", str(out), "--workers", "2"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| mode |" in table and "code pass@1" in table and "QA exact match" in table
    data = json.loads((out / "results.json").read_text())
    assert [s["label"] for s in data["summary"]] == ["ar L=8", "diffusion L=8 t=0.5", "diffusion L=8 t=0.9"]
    for s in data["summary"]:
        assert set(s["accuracy"]) == {"code", "qa", "all"} and s["tpf"] > 0 and s["nfe"] > 0
    for r in data["results"]:
        assert [t["task_id"] for t in r["tasks"]] == ["code/001", "code/002", "qa/001", "qa/002"]
        assert all(isinstance(t["passed"], bool) and "completion" in t for t in r["tasks"])
    assert (out / "accuracy_vs_tpf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
