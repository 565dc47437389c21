"""benchmarks/replay.py on synthetic recordings (no model): the replay drives the real engine and
policy, and its accounting is right (text that copies its prompt speeds up, novel text does not
slow down beyond the policy's exploration)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _replay():
    spec = importlib.util.spec_from_file_location(
        "replay", os.path.join(ROOT, "benchmarks", "replay.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_copied_text_speeds_up_and_novel_text_does_not_lose():
    replay = _replay()
    phrase = list(range(100, 140))
    copying = [(phrase + [7, 8], phrase * 3)] * 4               # the output repeats the prompt
    # nothing ever repeats, not even across requests (the recycled successors are engine-wide)
    novel = [(list(range(200 + 40 * i, 230 + 40 * i)), list(range(1000 + 100 * i, 1096 + 100 * i)))
             for i in range(4)]
    ts, speed, levels = replay.replay_lade(copying, cost=0.03, seed=0)
    ng_ts, ng_speed = replay.replay_ngram(copying, cost=0.03)
    assert ts > 3.0 and speed > 2.0 and ng_ts > 3.0, (ts, speed, ng_ts, levels)
    ts, speed, levels = replay.replay_lade(novel, cost=0.03, seed=0)
    assert ts == 1.0 and speed >= 0.95, (ts, speed, levels)   # only exploration can cost
    assert replay.replay_ngram(novel, cost=0.03) == (1.0, 1.0)
