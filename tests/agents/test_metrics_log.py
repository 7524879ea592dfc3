"""The JSONL metrics log survives a kill mid-write and rewinds to a checkpoint on resume."""

import pytest

from agents.metrics_log import MetricsLog


def test_torn_last_line_is_ignored_and_truncate_rewinds(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 5):
        log.write(step, loss=1.0 / step)
    log.write(5, eval_ndcg=0.5)
    with log.path.open("a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 5]
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    png = log.plot(tmp_path / "m.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_reasoning_run_gets_a_third_panel(tmp_path):
    from PIL import Image

    plain, reasoning = MetricsLog(tmp_path / "plain.jsonl"), MetricsLog(tmp_path / "reasoning.jsonl")
    for step in range(1, 4):
        plain.write(step, loss=1.0 / step)
        reasoning.write(step, loss=1.0 / step, reasoning_kept=0.5, embed_emitted=step / 4, reasoning_len=9.0)
    widths = [Image.open(log.plot(tmp_path / f"{name}.png")).width for name, log in
              (("plain", plain), ("reasoning", reasoning))]
    assert widths[1] == pytest.approx(widths[0] * 3 / 2, rel=0.02)


def test_a_torn_line_in_the_middle_is_an_error(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        log.read()
