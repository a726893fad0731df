"""Offline scoring (``loraxs-score`` / ``loraxs-serve --batch``): a JSONL of rows for mixed
adapters, through a bank smaller than the number of adapters, answers what each adapter alone
computes, in input order; a bad line stops the run by line number and writes nothing."""

import json

import numpy as np
import pytest

import loraxs_jax as lx
from loraxs_jax.serving import score, server


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _args(tiny_bert, z, src, out, flag="--in"):
    return ["--model", str(tiny_bert), "--adapters", str(z.folder), "--num-labels", "3",
            "--capacity", "3", "--max-batch", "4", "--max-prompt-tokens", "32",
            flag, str(src), "--out", str(out)]


def test_score_jsonl_equals_each_adapter_alone(tmp_path, tiny_bert, encoder_zoo, capsys):
    z = encoder_zoo
    rows = [{"adapter": "e2", "input": "a gripping, funny film", "id": "x"},
            {"adapter": "e0", "input": "dull"},
            {"adapter": "e1", "input": "the cast is great"},
            {"adapter": "e0", "input": "not my kind of movie", "id": 7},
            {"adapter": "e2", "input": "fine"}]
    src = _write(tmp_path / "in.jsonl", rows[:2] + [""] + rows[2:])     # a blank line is skipped
    score.main(_args(tiny_bert, z, src, tmp_path / "out.jsonl"))
    assert "scored 5 rows" in capsys.readouterr().out
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [g["id"] for g in got] == ["x", 2, 4, 7, 6]                   # line numbers by default
    for row, g in zip(rows, got):
        assert g["adapter"] == row["adapter"]
        tok = z.tokenizer([row["input"]], return_tensors="np")
        want = np.asarray(lx.wrap(z.model.apply)({"params": z.alone(row["adapter"])},
                                                 tok["input_ids"], tok["attention_mask"]))[0]
        np.testing.assert_allclose(g["logits"], want, rtol=1e-5, atol=1e-5)
        assert g["label"] == int(np.argmax(want))
    server.main(_args(tiny_bert, z, src, tmp_path / "same.jsonl", flag="--batch"))
    same = [json.loads(line) for line in (tmp_path / "same.jsonl").read_text().splitlines()]
    for a, b in zip(got, same):
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    ('["a"]', "line 2: a JSON list, not an object"),
    ('{"adapter": "nope", "input": "x"}', "line 2: unknown adapter 'nope'"),
    ('{"adapter": "../e0", "input": "x"}', "line 2: unknown adapter"),
    ('{"adapter": "e0", "input": 3}', "line 2: 'input' must be a string"),
    ('{"adapter": "e0", "input": "x", "colour": 1}', r"line 2: unknown fields \['colour'\]"),
    ('{"adapter": "e0", "input": "x", "max_tokens": 3}', "line 2: 'max_tokens' is for"),
    ('{"adapter": "e0", "input": "' + "word " * 40 + '"}', "line 2: input 0 is 4"),
])
def test_a_bad_line_stops_the_run_by_number(tmp_path, tiny_bert, encoder_zoo, line, message):
    src = _write(tmp_path / "in.jsonl", [{"adapter": "e0", "input": "fine"}, line])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit, match=f"error: .*in.jsonl {message}"):
        score.main(_args(tiny_bert, encoder_zoo, src, out))
    assert not out.exists() and not (tmp_path / "out.jsonl.tmp").exists()


def test_missing_input_and_lone_batch_flag(tmp_path, tiny_bert, encoder_zoo):
    with pytest.raises(SystemExit, match="error: no input file"):
        score.main(_args(tiny_bert, encoder_zoo, tmp_path / "absent.jsonl", tmp_path / "o"))
    with pytest.raises(SystemExit):
        server.main(["--model", str(tiny_bert), "--adapters", str(encoder_zoo.folder),
                     "--batch", "x.jsonl"])
