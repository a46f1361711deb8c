"""Writes the sets `bearwatch bench loop` plays the analyst on (benches/data/loop/), none of them
trained on:
- `sentfin-dev.jsonl`: every SEntFiN headline of the dev split (the protocol's settings are chosen
  on it);
- `sentfin-final.jsonl`: every SEntFiN headline of the final split, for the one run that reports;
- `phrasebank-dev.jsonl`, `tweets-dev.jsonl`: the whole dev split of PhraseBank and of the finance
  tweets (sentiment), the "elsewhere" the loop must not hurt;
- `sentfin-train-3000.jsonl`: 3,000 SEntFiN headlines of the train split (a seeded sample), which
  the shipped model trained on but a model trained without SEntFiN (`run.sh --sets
  phrasebank,tweets_sentiment,tweets_topic,reuters`) never saw: the unseen domain the encoder
  fine-tune is measured on (1,000 labels from it, the rest untouched).
- `phrasebank-train.jsonl`: 3,000 PhraseBank sentences of the train split (a seeded sample, as
  above), the second unseen domain,
  for a model trained without PhraseBank (`run.sh --sets sentfin,tweets_sentiment,tweets_topic,reuters`);
  `sentfin-dev.jsonl` is then one of the sets it must not hurt.
Lines: {"text", "head", "label", "set"}, as models/refit/*.jsonl.
    python3 models/train/loop_sets.py
"""
import json
import random

import data

SETS = {
    "sentfin-train-3000": ("train", "sentfin"),
    "phrasebank-train": ("train", "phrasebank"),
    "sentfin-dev": ("dev", "sentfin"),
    "sentfin-final": ("final", "sentfin"),
    "phrasebank-dev": ("dev", "phrasebank"),
    "tweets-dev": ("dev", "tweets_sentiment"),
}


def main():
    splits = data.load()
    folder = data.ROOT / "benches" / "data" / "loop"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (split, source) in SETS.items():
        items = splits[split][source]
        if split == "train" and len(items) > 3000:
            items = random.Random(13).sample(items, 3000)
        lines = [{"text": i.text, "head": "sentiment", "label": data.SENTIMENT[i.sentiment], "set": source} for i in items]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
        print(name, len(lines))


if __name__ == "__main__":
    main()
