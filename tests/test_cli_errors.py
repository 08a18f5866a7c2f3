"""Corrupted input through the recipe commands: one line on stderr naming file, line and field,
exit status 2, no traceback (ENGINE_DEBUG=1 brings the traceback back)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from recipes import common
from tests.recipe_cli import ROOT, env

GOOD_SFT = '{"prompt": "Say hi.", "response": "Hi."}\n'
GOOD_RM = '{"prompt": "Say hi.", "completions": ["Hi.", "No."], "ranking": [0, 1]}\n'

CASES = {  # name: (stage, file bytes, what the message must say)
    "bad_json": ("sft", GOOD_SFT + "{not json}\n", ":2: invalid JSON"),
    "missing_field": ("sft", GOOD_SFT + '{"prompt": "a"}\n', ":2: missing field 'response'"),
    "wrong_type": ("sft", '{"prompt": 3, "response": "b"}\n', ":1: field 'prompt' must be a string, got int"),
    "truncated_last_line": ("sft", GOOD_SFT * 3 + '{"prompt": "a", "resp', ":4: invalid JSON"),
    "empty_file": ("sft", "", ": file is empty"),
    "bad_role": ("sft", '{"messages": [{"role": "robot", "content": "x"}]}\n', ":1: field 'messages[0].role'"),
    "ranking_length": ("rm", GOOD_RM + '{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1, 2]}\n',
                       ":2: field 'ranking' has 3 entries but 'completions' has 2"),
    "k_equals_1": ("rm", '{"prompt": "p", "completions": ["a"], "ranking": [0]}\n',
                   ":1: field 'completions' needs at least 2 completions, got 1"),
    "ranking_types": ("rm", '{"prompt": "p", "completions": ["a", "b"], "ranking": ["a", "b"]}\n',
                      ":1: field 'ranking[0]' must be an int, got string"),
    "not_an_object": ("rm", GOOD_RM + "[1, 2]\n", ":2: expected a JSON object, got list"),
    "invalid_utf8": ("rm", GOOD_RM.encode() + b'{"prompt": "\xff"}\n', ":2: invalid UTF-8"),
    "ranking_range": ("rm", '{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 5]}\n',
                      ":1: field 'ranking[1]' is 5, must be in [0, 1]"),
}


def _write(tmp_path, name, content):
    f = tmp_path / f"{name}.jsonl"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    return f


@pytest.mark.parametrize("name", sorted(CASES))
def test_corrupt_jsonl_is_one_clear_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ENGINE_DEBUG", raising=False)
    stage, content, want = CASES[name]
    f = _write(tmp_path, name, content)
    mod = __import__(f"recipes.{stage}", fromlist=["main"])
    with pytest.raises(SystemExit) as e:
        common.cli(mod.main, [f"--data.path={f}", "--out", str(tmp_path / "run"), "--train.progress=false"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {f}") and want in err[0], err[0]


@pytest.mark.parametrize("name", ["bad_json", "k_equals_1"])
def test_command_line_prints_no_traceback(name, tmp_path):
    stage, content, want = CASES[name]
    f = _write(tmp_path, name, content)
    args = [sys.executable, "-m", f"recipes.{stage}", f"--data.path={f}", "--out", str(tmp_path / "run")]
    p = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(lines) == 1 and want in lines[0], p.stderr
    p = subprocess.run(args, cwd=ROOT, env=env(ENGINE_DEBUG=1), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr and "DataError" in p.stderr


def test_config_error_is_one_line(tmp_path, capsys):
    from recipes import sft
    with pytest.raises(SystemExit) as e:
        common.cli(sft.main, ["--train.batch_size=6", "--train.micro_batch_size=4", "--out", str(tmp_path),
                              "--train.progress=false", "--data.seq_len=32"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.batch_size=6 is not a multiple of train.micro_batch_size=4" in err[0]


@pytest.mark.parametrize("flags, says", [
    (["--ppo.batch_size=64", "--ppo.minibatch_size=48"], "[ppo] batch_size=64 must be a multiple of minibatch_size=48"),
    (["--ppo.critic=false", "--ppo.critic_warmup=2"], "[ppo] critic_warmup=2 needs critic=True"),
])
def test_section_checks_run_on_overrides(flags, says):
    """A section's own checks (PPOConfig.__post_init__) also judge the values the command line
    sets: one line naming the section, before anything is loaded."""
    from recipes import ppo
    with pytest.raises(SystemExit) as e:  # the message is what the interpreter prints, exit status 1
        common.cli(ppo.main, flags)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("config error: ") and says in msg, msg
