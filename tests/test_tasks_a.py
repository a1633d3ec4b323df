"""Entity scores against seqeval itself, on random tag sequences. seqeval is in the dev extra; without it the tests
are skipped, except in CI (env CI set), where they fail instead."""
import os
import random

import pytest
import torch

from nbtrain.tagging import EntityF1, entity_scores, entity_spans

try:
    import seqeval.metrics as seqeval
    missing = None
except ImportError as e:
    missing = f"the seqeval checks need seqeval, a dev requirement (pip install -e '.[dev]'): {e}"
if missing and os.environ.get("CI"):
    pytest.fail(missing + " (CI is set: .ci/run's set-up must install it)", pytrace=False)
if missing:
    pytest.skip(missing, allow_module_level=True)
from seqeval.metrics.sequence_labeling import get_entities  # noqa: E402

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


def random_tags(rng: random.Random, n: int, scheme=TAGS) -> list[list[str]]:
    return [[rng.choice(scheme) for _ in range(rng.randint(1, 12))] for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_spans_and_scores_match_seqeval(seed):
    rng = random.Random(seed)
    iobes = TAGS + ["E-PER", "S-PER", "E-LOC", "S-LOC"]
    for row in random_tags(rng, 200, iobes): assert entity_spans(row) == get_entities(row)
    true = random_tags(rng, 300)
    pred = [[t if rng.random() < 0.7 else rng.choice(TAGS) for t in row] for row in true]
    ours = entity_scores(true, pred)
    assert ours["precision"] == pytest.approx(seqeval.precision_score(true, pred))
    assert ours["recall"] == pytest.approx(seqeval.recall_score(true, pred))
    assert ours["f1"] == pytest.approx(seqeval.f1_score(true, pred))


def test_streaming_metric_matches_seqeval_on_padded_batches():
    rng = random.Random(7)
    true = random_tags(rng, 64)
    pred = [[t if rng.random() < 0.6 else rng.choice(TAGS) for t in row] for row in true]
    m = EntityF1(TAGS, per_type=True)
    for i in range(0, 64, 16):  # batches padded with -100 to their longest row
        rows_t, rows_p = true[i:i + 16], pred[i:i + 16]
        width = max(map(len, rows_t)) + 2
        target = torch.tensor([[-100] + [TAGS.index(t) for t in r] + [-100] * (width - 1 - len(r)) for r in rows_t])
        ids = torch.tensor([[0] + [TAGS.index(t) for t in r] + [0] * (width - 1 - len(r)) for r in rows_p])
        m.update(ids, target)
    out = m.compute()
    assert out["f1"] == pytest.approx(seqeval.f1_score(true, pred))
    report = seqeval.classification_report(true, pred, output_dict=True)
    for t in ("PER", "LOC", "ORG"): assert out[f"{t}_f1"] == pytest.approx(report[t]["f1-score"])
