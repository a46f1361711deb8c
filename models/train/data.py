"""Training data for the bearwatch classifier: the three sets in ../shared/data, split deterministically.

Every split is decided by the SHA-1 of the item's text (or Reuters id), so the validation sets are the
same on every machine and every run, whatever the seed.
"""
import csv
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
MODELS = ROOT / "models"

SENTIMENT = ["negative", "neutral", "positive"]
LABELS = json.loads((MODELS / "labels.json").read_text())
TOPICS = LABELS["topics"]
assert LABELS["sentiment"] == SENTIMENT

# Twitter financial news: 0 = bearish, 1 = bullish, 2 = neutral.
TWITTER_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}
# When a Reuters story carries several categories, the first topic in this order wins.
TOPIC_PRIORITY = ["earnings", "mergers_acquisitions", "energy", "metals", "agriculture",
                  "monetary_policy", "currencies", "macro", "other"]


# Body characters appended to the headline in the "headline + body" input; the Rust side's
# `body_chars` setting builds the same text.
BODY_CHARS = 200


def with_body(headline: str, body: str, chars: int) -> str:
    return f"{headline} {body[:chars]}"


def bucket(key: str) -> float:
    """A stable number in [0, 1) for a string: the split decision.

    Salted: the PhraseBank file is itself what remained after taking the first 20 % by plain SHA-1
    order, so an unsalted hash would put every PhraseBank sentence on one side.
    """
    return int(hashlib.sha1(b"bearwatch-val:" + key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def reuters_topic_map():
    with open(MODELS / "topics.csv", newline="") as f:
        return {row["reuters_category"]: row["topic"] for row in csv.DictReader(f)}


def reuters_topic(categories, mapping):
    topics = {mapping.get(c, "other") for c in categories}
    for topic in TOPIC_PRIORITY:
        if topic in topics:
            return topic
    return "other"  # a story with no Reuters category


def phrasebank_agreement():
    """{sentence: strictest annotator agreement it reached (50, 66, 75 or 100)}."""
    with open(DATA / "financial-phrasebank" / "fpb_train.csv", newline="", encoding="utf-8") as f:
        return {row["text"]: int(row["agree"]) for row in csv.DictReader(f)}


def load(val_share=0.15):
    """Returns {"train": [...], "val": {name: [...]}}.

    Each item is (text, sentiment_id | -1, topic_id | -1, source, lead): `lead` is the headline followed
    by the start of the body (Reuters only, else None), the input when a pipeline adds body text.
    """
    train, val = [], {"phrasebank": [], "twitter": [], "reuters": []}

    with open(DATA / "financial-phrasebank" / "fpb_train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            item = (row["text"], SENTIMENT.index(row["label"]), -1, "phrasebank", None)
            (val["phrasebank"] if bucket(row["text"]) < val_share else train).append(item)

    with open(DATA / "twitter-financial-news-sentiment" / "sent_train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            item = (row["text"], SENTIMENT.index(TWITTER_LABELS[row["label"]]), -1, "twitter", None)
            (val["twitter"] if bucket(row["text"]) < val_share else train).append(item)

    mapping = reuters_topic_map()
    with open(DATA / "reuters21578" / "modapte_train.jsonl", encoding="utf-8") as f:
        for line in f:
            story = json.loads(line)
            headline = story["headline"].strip()
            if not headline:
                continue
            body = " ".join((story["body"] or "").split())
            lead = with_body(headline, body, BODY_CHARS) if body else None
            item = (headline, -1, TOPICS.index(reuters_topic(story["topics"], mapping)), "reuters", lead)
            (val["reuters"] if bucket(story["id"]) < val_share else train).append(item)

    return {"train": train, "val": val}
