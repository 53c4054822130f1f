"""``odma-mlu generate``: the --json document, greedy ids equal to transformers' generate,
and clear errors (exit code 2, no traceback) for a bad model folder or a prompt too long."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from odma_mlu.cli import main

PROMPT = "the cache model serve request with the people of the city"
MAX_NEW = 12


def _hf_greedy(model_dir: Path, prompt: str, max_new: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    hf.eval()
    ids = tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    return gen[0, len(ids):].tolist()


@pytest.mark.parametrize("policy", ["odma", "paged"])
def test_generate_json_matches_transformers(tiny_model_dir: Path, tmp_path: Path, policy: str,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gen.json"
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW),
               "--kv-policy", policy, "--backend", "cpu", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {"text", "token_ids", "kv_policy", "overflows", "preemptions"} <= set(doc)
    assert doc["kv_policy"] == policy
    assert isinstance(doc["text"], str) and doc["text"] in capsys.readouterr().out
    assert isinstance(doc["overflows"], int) and doc["overflows"] >= 0  # an overflow never changes tokens
    assert isinstance(doc["preemptions"], int) and doc["preemptions"] >= 0
    assert doc["token_ids"] == _hf_greedy(tiny_model_dir, PROMPT, MAX_NEW)


def test_generate_bad_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-model"
    rc = main(["generate", "--model", str(missing), "--prompt", "hello", "--backend", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_generate_corrupt_weights_no_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    proc = subprocess.run([sys.executable, "-m", "odma_mlu.cli", "generate", "--model", str(broken), "--prompt",
                           "hello", "--backend", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_prompt_too_long(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    prompt = " ".join(["hello"] * 2100)  # > the tiny model's 2048 positions
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", prompt, "--max-new-tokens", "8",
               "--backend", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "2048" in err and "Traceback" not in err
