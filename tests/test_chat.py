"""Trying a result: `fnsft generate` streams its reply with validated sampling flags; `fnsft chat` keeps the
conversation across turns."""

from __future__ import annotations

import io
import subprocess
import sys

from hostile import cli, one_line


def test_chat_keeps_the_conversation_and_resets_it(tiny_llama, monkeypatch, capsys):
    from functionalnetworkssft import generate

    seen = []

    def fake_reply(model, tokenizer, messages, max_new_tokens, temperature=0.0, top_p=1.0, stream=False):
        seen.append([dict(m) for m in messages])
        answer = f"answer {len(seen)}"
        print(answer)
        return answer

    monkeypatch.setattr(generate, "reply", fake_reply)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nHow are you?\n/reset\nAgain\n"))
    code, errors, printed = cli(capsys, "chat", tiny_llama, "--system", "Be brief.")
    assert code == 0, errors
    assert printed.split() == ["answer", "1", "answer", "2", "answer", "3"]
    assert seen[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                       {"role": "assistant", "content": "answer 1"}, {"role": "user", "content": "How are you?"}]
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Again"}]


def test_chat_runs_a_real_model_through_stdin(tiny_llama):
    result = subprocess.run([sys.executable, "-m", "functionalnetworkssft", "chat", str(tiny_llama),
                             "--max_new_tokens", "4"], input=b"Hello\nAnd again\n", capture_output=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert b"Chatting with" in result.stderr


def test_generate_streams_the_reply_it_returns(tiny_llama, capsys):
    from functionalnetworkssft.generate import load_for_inference, reply

    model, tokenizer = load_for_inference(str(tiny_llama))
    capsys.readouterr()
    answer = reply(model, tokenizer, [{"role": "user", "content": "Hi"}], 6, stream=True)
    streamed = capsys.readouterr().out
    assert streamed.strip() == answer and answer


def test_sampling_flags_are_checked_up_front(capsys):
    code, errors, _ = cli(capsys, "generate", "./no-model", "--prompt", "hi", "--top_p", "0")
    assert code == 2
    one_line(errors, "--top_p must be in (0, 1] (got 0)")
    code, errors, _ = cli(capsys, "chat", "./no-model", "--temperature", "nan")
    assert code == 2
    one_line(errors, "--temperature must be a finite number")
    code, errors, _ = cli(capsys, "generate", "./no-model")
    assert code == 2
    one_line(errors, "--prompt is required")
