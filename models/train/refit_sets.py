"""Writes the examples `bearwatch model retrain` needs, shipped with the model (models/refit/):
- `anchors.jsonl`: a fixed sample of the training split of every set, which each refit trains on
  beside the analysts' labels, so that the heads do not forget what they knew;
- `eval.jsonl`: a fixed sample of the dev split, the frozen evaluation set on which every candidate
  is compared with the champion.
The final split stays untouched. Samples are the first items by the salted hash of their text
(`data.bucket`), so they are the same on every run. Lines: {"text", "head", "label", "set"}.
    ../../.venv-train/bin/python refit_sets.py
"""
import json

import data

ANCHORS = {"phrasebank": 1000, "sentfin": 1000, "tweets_sentiment": 1000, "tweets_topic": 1500, "reuters": 1500}
EVAL = {"phrasebank": 300, "sentfin": 300, "tweets_sentiment": 300, "tweets_topic": 400, "reuters": 400}


def sample(items, n):
    return sorted(items, key=lambda item: data.bucket("refit:" + item.text))[:n]


def rows(split, sizes):
    out = []
    for name, n in sizes.items():
        for item in sample(split.get(name, []), n):
            if item.sentiment is not None:
                out.append({"text": item.text, "head": "sentiment", "label": data.SENTIMENT[item.sentiment], "set": name})
            if item.topic is not None:
                out.append({"text": item.text, "head": "topic", "label": data.TOPICS[item.topic], "set": name})
    return out


def main():
    splits = data.load()
    folder = data.MODELS / "refit"
    folder.mkdir(exist_ok=True)
    for name, split, sizes in (("anchors", "train", ANCHORS), ("eval", "dev", EVAL)):
        lines = rows(splits[split], sizes)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
        print(name, len(lines))


if __name__ == "__main__":
    main()
