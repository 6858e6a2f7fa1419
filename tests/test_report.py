"""Reports: the terminal renderables, the self-contained HTML file and the pandas export read back the right numbers."""

from __future__ import annotations

import base64
import html
import io
import os
import re
import sys
from html.parser import HTMLParser

import pytest
import torch
from rich.console import Console
from torch import nn

import hookinf
import hookinf.report
from hookinf import ConfigurationError, Scores
from hookinf.metrics import auc
from hookinf.report import (
    example_rows,
    save_html,
    save_suspects_html,
    scores_report,
    select_queries,
    suspects_report,
    suspects_table,
)

N_QUERY, N_TRAIN, K = 7, 40, 4


def synthetic(ids: bool = False, names: tuple[str, ...] = ("encoder.0", "encoder.2", "head")) -> Scores:
    """Three layers with different weights (shares about 1/2, 1/3, 1/6 with noise), query rows of different size."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.linspace(0.5, 3.0, N_QUERY, dtype=torch.float64)[torch.randperm(N_QUERY, generator=gen)]
    per_layer = {
        name: weight * rows[:, None] * torch.randn(N_QUERY, N_TRAIN, generator=gen, dtype=torch.float64)
        for name, weight in zip(names, (3.0, 2.0, 1.0), strict=True)
    }
    damping = {name: 0.01 * (i + 1) for i, name in enumerate(names)}
    store_ids = torch.arange(1000, 1000 + 3 * N_TRAIN, 3) if ids else None
    return Scores(per_layer=per_layer, method="ekfac", damping=damping, ids=store_ids)


def digit_images(n: int) -> torch.Tensor:
    return torch.rand(n, 8, 8, generator=torch.Generator().manual_seed(1))


def render(renderable) -> str:
    console = Console(file=io.StringIO(), width=1000, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside each element with an id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def by_id(self, element_id: str) -> dict[str, str]:
        found = [attrs for _, attrs in self.tags if attrs.get("id") == element_id]
        assert len(found) == 1, (element_id, len(found))
        return found[0]

    def table_rows(self, table_id: str, text: str) -> list[dict[str, str]]:
        """The ``data-*`` attributes of the rows of one table (the tables do not nest)."""
        start = text.index(f'id="{table_id}"')
        body = text[start : text.index("</table>", start)]
        return [dict(re.findall(r'(data-[a-z]+)="([^"]*)"', row)) for row in re.findall(r"<tr data-[^>]*>", body)]


# ---------------------------------------------------------------------------------------------------- selection
def test_top_queries_rank_by_total_absolute_influence_and_queries_are_validated():
    scores = synthetic()
    mass = scores.total.abs().sum(dim=1)
    expected = mass.argsort(descending=True).tolist()
    assert scores.top_queries(N_QUERY) == expected
    assert select_queries(scores, None) == expected[:3]
    assert select_queries(scores, 5) == expected[:5]
    assert select_queries(scores, 100) == expected
    assert select_queries(scores, 0) == []
    assert select_queries(scores, [6, 0, 3]) == [6, 0, 3]
    for bad, message in [
        (-1, "must be >= 0"),
        ([0, N_QUERY], f"not a query index; the scores have queries 0 … {N_QUERY - 1}"),
        ([True], "not a query index"),
        ("0", "must be None, a number of queries, or a sequence"),
    ]:
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            select_queries(scores, bad)


def test_query_layer_shares_are_each_querys_split_of_its_absolute_influence():
    scores = synthetic()
    shares = scores.query_layer_shares()
    assert shares.shape == (N_QUERY, 3)
    mass = torch.stack([p.abs().sum(dim=1) for p in scores.per_layer.values()]).sum(0)
    for layer, part in enumerate(scores.per_layer.values()):
        torch.testing.assert_close(shares[:, layer], part.abs().sum(dim=1) / mass)
    zero = Scores(per_layer={"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, method="identity")
    assert torch.equal(zero.query_layer_shares(), torch.zeros(2, 2, dtype=torch.float64))


def test_example_rows_are_top_k_with_the_largest_layer_part():
    scores = synthetic(ids=True)
    top = scores.top_k(K)
    for q in range(N_QUERY):
        harmful, helpful = example_rows(scores, q, K)
        assert [r.index for r in harmful] == top.harmful[q].tolist()
        assert [r.index for r in helpful] == top.helpful[q].tolist()
        assert [r.score for r in harmful] == top.harmful_scores[q].tolist()
        for row in harmful + helpful:
            assert row.shown == int(scores.ids[row.index])
            parts = {name: float(part[q, row.index]) for name, part in scores.per_layer.items()}
            assert abs(row.part) == max(abs(v) for v in parts.values())
            assert parts[row.layer] == row.part
    with pytest.raises(ConfigurationError, match="k=0"):
        example_rows(scores, 0, 0)


# ---------------------------------------------------------------------------------------------------- terminal
def test_terminal_report_has_summary_layers_detailed_queries_and_described_examples():
    scores = synthetic()
    text = render(scores_report(scores, k=2, describe=lambda i: f"[red]ex{i}[/red]"))
    assert f"top 1% of (query, example) pairs hold {scores.concentration(0.01):.1%}" in text
    assert "Positive scores are harmful" in text
    for name in scores.layers:
        assert name in text
    chosen = scores.top_queries(3)
    for q in chosen:
        assert f"Query {q}: most harmful" in text
    others = set(range(N_QUERY)) - set(chosen)
    assert not any(f"Query {q}: most harmful" in text for q in others)
    top = scores.top_k(2)
    # the description is printed as given: rich markup in user text is not interpreted
    assert f"[red]ex{int(top.harmful[chosen[0], 0])}[/red]" in text
    shares = scores.query_layer_shares()
    assert f"{float(shares[chosen[0], 0]):.1%}" in text


def test_scores_report_method_prints_to_the_given_console():
    scores = synthetic()
    console = Console(file=io.StringIO(), width=200)
    scores.report(queries=[2], k=1, console=console)
    text = console.file.getvalue()
    assert "Query 2: most harmful" in text
    assert "Query 0: most harmful" not in text


def test_suspects_report_gives_the_auc_and_precision_of_the_known_flips():
    gen = torch.Generator().manual_seed(2)
    flipped = torch.zeros(50, dtype=torch.bool)
    flipped[:5] = True
    self_scores = torch.rand(50, generator=gen, dtype=torch.float64) + 0.6 * flipped
    text = render(suspects_report(self_scores, flipped=flipped, k=8, describe=lambda i: f"doc {i}"))
    expected_auc = auc(self_scores, flipped)
    top5 = self_scores.topk(5).indices
    precision = float(flipped[top5].double().mean())
    assert f"AUC {expected_auc:.3f} for the 5 known flips" in text
    assert f"{precision:.0%} of the top 5 suspects are flips" in text
    assert f"doc {int(self_scores.argmax())}" in text
    assert "AUC" not in render(suspects_report(self_scores, k=3))
    with pytest.raises(ConfigurationError, match=r"flipped must be a bool tensor \[n_train=50\]"):
        suspects_report(self_scores, flipped=flipped.long())
    with pytest.raises(ConfigurationError, match="self_scores must be"):
        suspects_table(torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------------- HTML
@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    pytest.importorskip("matplotlib")
    scores = synthetic()
    images = digit_images(N_TRAIN)
    path = tmp_path_factory.mktemp("html") / "report.html"
    written = scores.save_html(
        path,
        title="Report <of> \"things\" & 'stuff'",
        describe=lambda i: f"<script>alert({i})</script> & ex{i}",
        images=lambda i: images[i],
        queries=[5, 1, 3],
        k=K,
        describe_query=lambda q: f"query <{q}>",
        query_images=lambda q: images[q].numpy(),
    )
    assert written == path
    return scores, path.read_text(encoding="utf-8"), path


def test_html_per_layer_shares_and_top_k_read_back_exactly(report_html):
    scores, text, _ = report_html
    parsed = Elements(text)
    rows = parsed.table_rows("influence-layers", text)
    assert [html.unescape(r["data-layer"]) for r in rows] == list(scores.layers)
    assert [float(r["data-share"]) for r in rows] == list(scores.layer_shares().values())
    top = scores.top_k(K)
    for q in (5, 1, 3):
        for direction, indices, values in (
            ("harmful", top.harmful, top.harmful_scores),
            ("helpful", top.helpful, top.helpful_scores),
        ):
            found = parsed.table_rows(f"influence-q{q}-{direction}", text)
            assert [int(r["data-train"]) for r in found] == indices[q].tolist()
            assert [float(r["data-score"]) for r in found] == values[q].tolist()
    assert 'id="influence-q0-harmful"' not in text
    assert f"{scores.concentration(0.01):.1%} of |influence|" in text
    assert "5 × 40" not in text
    assert f"{N_QUERY:,} × {N_TRAIN:,}" in text


def test_html_has_every_plot_as_inline_svg_and_draws_layer_shares_once(report_html):
    scores, text, _ = report_html
    parsed = Elements(text)
    for plot in ("heatmap", "distribution", "query-shares"):
        parsed.by_id(f"influence-{plot}")
        start = text.index(f'id="influence-{plot}"')
        assert text[start : text.index("</figure>", start)].count("<svg") == 1, plot
    assert text.count("<svg") == 3
    assert "<?xml" not in text
    assert "<!DOCTYPE svg" not in text
    # the overall layer shares are drawn once: a bar in each row of the per-layer table, no second bar chart of them
    assert 'id="influence-layer-shares"' not in text
    table = text[text.index('id="influence-layers"') : text.index("</table>", text.index('id="influence-layers"'))]
    assert table.count('class="bar"') == len(scores.layers)
    assert text.count('class="bar"') == len(scores.layers)


def test_html_escapes_user_text(report_html):
    _, text, _ = report_html
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(" in text
    assert "<title>Report &lt;of&gt; &quot;things&quot; &amp; &#x27;stuff&#x27;</title>" in text
    assert "Query 5: query &lt;5&gt;" in text
    scores = synthetic(names=("<b>enc</b>", "dec", "head"))
    section = hookinf.report.scores_section(scores, queries=1, k=1)
    assert "<b>" not in section.body
    assert "&lt;b&gt;enc&lt;/b&gt;" in section.body


def test_html_is_self_contained_without_scripts_or_network(report_html):
    _, text, _ = report_html
    parsed = Elements(text)
    assert not any(tag == "script" for tag, _ in parsed.tags)
    assert not re.search(r"\son[a-z]+=", text)  # no inline event handlers
    assert not re.search(r"url\(\s*['\"]?https?:", text)
    for tag, attrs in parsed.tags:
        for key in ("src", "href", "xlink:href"):
            if key in attrs:
                assert attrs[key].startswith(("#", "data:image/png;base64,")), (tag, key, attrs[key][:60])
    csp = [a for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp
    assert "default-src 'none'" in csp[0]["content"]
    images = [a for t, a in parsed.tags if t == "img"]
    assert len(images) == 3 + 3 * 2 * K  # a picture per detailed query, one per listed training example
    for attrs in images:
        png = base64.b64decode(attrs["src"].split(",", 1)[1])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_html_file_is_written_atomically_readable_and_deterministic(report_html, tmp_path):
    scores, _text, path = report_html
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temporary file left behind
    again = scores.save_html(tmp_path / "again.html", title="x", queries=[5, 1, 3], k=K)
    assert again.read_text() == scores.save_html(tmp_path / "twice.html", title="x", queries=[5, 1, 3], k=K).read_text()

    # a failure while building the page leaves an existing file untouched and no temporary file
    target = tmp_path / "keep.html"
    target.write_text("old")

    def broken(index: int) -> str:
        raise RuntimeError("describe failed")

    with pytest.raises(RuntimeError, match="describe failed"):
        scores.save_html(target, describe=broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.html", "keep.html", "twice.html"]


def test_html_stays_small_for_100_queries_by_5000_training_examples(tmp_path):
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(3)
    per_layer = {f"layer{i}": torch.randn(100, 5000, generator=gen, dtype=torch.float64) for i in range(4)}
    images = digit_images(5000)
    path = Scores(per_layer=per_layer, method="exact").save_html(
        tmp_path / "big.html", images=lambda i: images[i], describe=str, queries=5, k=10
    )
    assert path.stat().st_size < 2_000_000


@pytest.mark.parametrize(
    ("image", "shape"),
    [
        (torch.rand(8, 8), (8, 8)),
        (torch.rand(3, 10, 12), (10, 12)),  # [C, H, W]
        (torch.rand(10, 12, 3).numpy(), (10, 12)),
        ((torch.rand(200, 130) * 255).to(torch.uint8), (50, 33)),  # every 4th pixel: at most 64 a side
        (torch.rand(1, 5, 6), (5, 6)),
    ],
)
def test_thumbnails_are_pngs_of_the_image(image, shape):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    uri = hookinf.report.thumbnail(image)
    assert uri.startswith("data:image/png;base64,")
    decoded = imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")
    assert decoded.shape[:2] == shape


def test_grey_thumbnail_in_unit_range_keeps_its_scale():
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    image = torch.full((4, 4), 0.5)
    decoded = imread(io.BytesIO(base64.b64decode(hookinf.report.thumbnail(image).split(",", 1)[1])), format="png")
    assert abs(float(decoded[..., 0].mean()) - 0.5) < 0.01  # not stretched to black or white


@pytest.mark.parametrize("bad", [torch.rand(2, 3, 4, 5), torch.rand(8, 8, 2), torch.full((3, 3), float("nan"))])
def test_bad_images_are_configuration_errors(bad):
    pytest.importorskip("matplotlib")
    with pytest.raises(ConfigurationError, match="images"):
        hookinf.report.thumbnail(bad)


def test_suspects_html_has_the_auc_roc_and_ranked_suspects(tmp_path):
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(4)
    flipped = torch.rand(60, generator=gen) < 0.15
    self_scores = torch.rand(60, generator=gen, dtype=torch.float64).exp() + flipped * 0.8
    images = digit_images(60)
    path = save_suspects_html(
        tmp_path / "suspects.html", self_scores, flipped=flipped, describe=lambda i: f"label <{i}>",
        images=lambda i: images[i], k=7,
    )  # fmt: skip
    text = path.read_text()
    parsed = Elements(text)
    assert float(parsed.by_id("suspects-auc")["data-auc"]) == auc(self_scores, flipped)
    rows = parsed.table_rows("suspects-table", text)
    assert [int(r["data-train"]) for r in rows] == self_scores.topk(7).indices.tolist()
    assert "label &lt;" in text
    parsed.by_id("suspects-plot")
    assert text.count("<svg") == 1
    # without the flips: no AUC, no flipped column
    section = hookinf.report.suspects_section(self_scores, k=3)
    assert "data-auc" not in section.body
    assert "flipped?" not in section.body


def test_pages_compose_sections_with_unique_anchors(tmp_path):
    pytest.importorskip("matplotlib")
    scores = synthetic()
    comparison = hookinf.report.comparison_section([("mlp · exact", 0.987, 0.9), ("cnn <x>", 0.75, 0.5)])
    first = hookinf.report.scores_section(scores, queries=1, k=1, anchor="first")
    second = hookinf.report.scores_section(scores, queries=1, k=1, anchor="second")
    text = save_html(tmp_path / "page.html", [comparison, first, second], title="t").read_text()
    assert [float(a) for a in re.findall(r'data-auc="([^"]+)"', text)] == [0.987, 0.75]
    assert '<a href="#first">' in text
    assert '<a href="#second">' in text
    assert "cnn &lt;x&gt;" in text
    ids = re.findall(r'\sid="([^"]+)"', text)  # the page's and the SVGs' (matplotlib's figure_1, clip paths, ...)
    assert len(ids) == len(set(ids))
    references = set(re.findall(r'(?:url\(#|href="#)([^)"]+)', text))
    assert references <= set(ids)  # every reference inside the SVGs resolves
    with pytest.raises(ConfigurationError, match="section anchors must differ"):
        hookinf.report.page("t", [first, first])
    with pytest.raises(ConfigurationError, match="anchor='Bad id'"):
        hookinf.report.comparison_section([], anchor="Bad id")


def test_missing_matplotlib_or_pandas_is_a_configuration_error_with_the_fix(monkeypatch, tmp_path):
    scores = synthetic()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConfigurationError, match=re.escape("pip install 'hookinf[report]'")):
        scores.save_html(tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ConfigurationError, match=re.escape("to_pandas needs pandas") + r".*hookinf\[report\]"):
        scores.to_pandas()


# ---------------------------------------------------------------------------------------------------- pandas
def test_to_pandas_round_trips_every_score():
    pytest.importorskip("pandas")
    scores = synthetic()
    df = scores.to_pandas()
    assert list(df.columns) == ["query", "train", "score", "layer/encoder.0", "layer/encoder.2", "layer/head"]
    assert len(df) == N_QUERY * N_TRAIN
    total = torch.tensor(df.pivot(index="query", columns="train", values="score").to_numpy())
    assert torch.equal(total, scores.total)
    for name, part in scores.per_layer.items():
        assert torch.equal(torch.tensor(df[f"layer/{name}"].to_numpy()).reshape(N_QUERY, N_TRAIN), part)
    row = df[(df["query"] == 3) & (df["train"] == 17)].iloc[0]
    assert row["score"] == float(scores.total[3, 17])
    assert torch.allclose(torch.tensor(df.filter(like="layer/").sum(axis=1).to_numpy()), scores.total.flatten())


def test_to_pandas_carries_store_ids():
    pytest.importorskip("pandas")
    scores = synthetic(ids=True)
    df = scores.to_pandas()
    assert list(df.columns[:4]) == ["query", "train", "id", "score"]
    assert torch.equal(torch.tensor(df["id"].to_numpy()[:N_TRAIN]), scores.ids)
    assert df["id"].iloc[N_TRAIN + 5] == int(scores.ids[5])
    unnamed = Scores(per_layer={"": torch.ones(1, 2)}, method="identity").to_pandas()
    assert "layer/<model>" in unnamed.columns


def test_grouped_sums_layers_into_blocks_and_keeps_totals() -> None:
    gen = torch.Generator().manual_seed(5)
    names = ["enc.layer.0.q.lora_A", "enc.layer.0.q.lora_B", "enc.layer.1.v.lora_A", "head"]
    per_token = {n: torch.randn(3, 7, 4, generator=gen, dtype=torch.float64) for n in names}
    per_layer = {n: t.sum(dim=2) for n, t in per_token.items()}
    scores = hookinf.Scores(per_layer=per_layer, method="exact", damping=dict.fromkeys(names, 0.1), per_token=per_token)
    blocks = scores.grouped(r"layer\.\d+")
    assert blocks.layers == ("layer.0", "layer.1", "head")  # first-appearance order; unmatched keep their name
    torch.testing.assert_close(blocks.per_layer["layer.0"], per_layer[names[0]] + per_layer[names[1]])
    torch.testing.assert_close(blocks.total, scores.total, rtol=1e-14, atol=1e-14)  # same parts, another order
    torch.testing.assert_close(blocks.token_scores(), scores.token_scores(), rtol=1e-14, atol=1e-14)
    assert blocks.damping == {}
    assert sum(blocks.layer_shares().values()) == pytest.approx(1.0)
    by_kind = scores.grouped(r"(lora_[AB]|head)$")  # a capturing group names the group
    assert by_kind.layers == ("lora_A", "lora_B", "head")
    assert scores.grouped(lambda name: name.split(".")[0]).layers == ("enc", "head")
    with pytest.raises(hookinf.ConfigurationError, match="not a regular expression"):
        scores.grouped("layer(")
    with pytest.raises(hookinf.ConfigurationError, match="must be a str"):
        scores.grouped(lambda name: 3)  # type: ignore[arg-type,return-value]


# ---------------------------------------------------------------------------------------------------- presenter
def test_scores_conveniences_go_through_the_registered_presenter(tmp_path):
    from hookinf.presenter import use_presenter

    scores = synthetic()
    calls = []

    class Recorder:
        def layer_table(self, scores, title):
            calls.append(("layer_table", title))
            return f"table {title}"

        def report(self, scores, *, queries, k, describe, console):
            calls.append(("report", queries, k))

        def save_html(self, scores, path, **options):
            calls.append(("save_html", options["queries"], options["k"]))
            return path

    previous = use_presenter(Recorder())
    try:
        assert scores.layer_table(title="t") == "table t"
        scores.report(queries=[1], k=2)
        assert scores.save_html(tmp_path / "x.html", queries=3) == tmp_path / "x.html"
        assert calls == [("layer_table", "t"), ("report", [1], 2), ("save_html", 3, 5)]
        use_presenter(None)
        for convenience in (scores.layer_table, scores.report, lambda: render(scores)):
            with pytest.raises(ConfigurationError, match=re.escape("import hookinf.report")):
                convenience()
        assert repr(scores).startswith("Scores(method='ekfac'")  # plain text: no presenter needed
    finally:
        use_presenter(previous)
    assert "Per-layer influence (ekfac)" in render(scores.layer_table())


def test_a_failed_html_write_names_the_target_and_keeps_what_was_there(tmp_path) -> None:
    """Real faults: the target is a directory (the rename fails), or its directory does not exist."""
    scores = Scores({"fc": torch.randn(2, 4, dtype=torch.float64)}, method="identity")
    occupied = tmp_path / "report.html"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("kept")
    with pytest.raises(hookinf.HookinfError, match=r"report\.html: cannot write the HTML report") as err:
        scores.save_html(occupied, queries=0)
    assert isinstance(err.value.__cause__, OSError)
    assert (occupied / "keep.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left beside it
    with pytest.raises(hookinf.HookinfError, match=r"missing/r\.html: cannot write"):
        scores.save_html(tmp_path / "missing" / "r.html", queries=0)


# ---------------------------------------------------------------------------------------------------- what prints
LORA_NAMES = tuple(
    f"base_model.model.encoder.layer.{i}.attention.self.{proj}.lora_{ab}"
    for i in (0, 11)
    for proj in ("query", "value")
    for ab in ("A", "B")
)


def test_print_of_a_layer_table_is_the_table_not_its_object_repr(capsys):
    scores = synthetic()
    print(scores.layer_table())
    out = capsys.readouterr().out
    assert "<rich.table.Table" not in out
    assert "Per-layer influence (ekfac)" in out
    for name, share in scores.layer_shares().items():
        assert name in out
        assert f"{share:6.1%}" in out
    assert str(hookinf.report.comparison_table([("exact", 0.9, 0.5)])).count("exact") == 1


def test_long_layer_names_are_cut_in_the_middle_keeping_their_distinct_ends():
    from hookinf.rich_text import middle_ellipsis

    assert middle_ellipsis("abcdefghij", 10) == "abcdefghij"
    cut = middle_ellipsis("abcdefghijklmnopqrstuvwxyz", 10)
    assert len(cut) == 10
    assert cut.startswith("abc")
    assert cut == "abc…uvwxyz"  # a third of what is kept from the start, two thirds from the end
    assert "…" in cut
    assert middle_ellipsis("abc", 1) == "…"
    scores = synthetic(names=LORA_NAMES[:3])
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(scores.layer_table())
    rows = [line for line in console.file.getvalue().splitlines() if "%" in line]
    assert len(rows) == 3
    assert all(len(line) <= 80 for line in rows)
    for row, name in zip(rows, LORA_NAMES[:3], strict=True):
        assert "…" in row
        assert name[-len("query.lora_A") :] in row  # the end that tells the layers apart stays
    cells = [row.split("│")[1].strip() for row in rows]
    assert len(set(cells)) == 3  # and no two rows read alike


def test_curvature_table_at_80_columns_keeps_the_ends_of_lora_like_names():
    model = nn.Module()
    leaves = []
    for name in LORA_NAMES:  # nested modules named like a PEFT model's LoRA factors
        parent = model
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(3, 3, dtype=torch.float64))
        leaves.append(model.get_submodule(name))

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_model = model.base_model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in leaves:
                x = torch.tanh(layer(x))
            return x

    chain = Chain()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=gen, dtype=torch.float64),) for _ in range(2)]
    curvature = hookinf.fit(chain, batches, lambda m, b: m(b[0]).pow(2).sum(dim=1), method="kfac", progress=False)
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(curvature)
    rows = [line for line in console.file.getvalue().splitlines() if "×" in line and "[" in line]
    assert len(rows) == len(LORA_NAMES)
    assert all(len(line) <= 80 for line in rows)
    cells = [row.split("│")[1].strip() for row in rows]
    assert len(set(cells)) == len(LORA_NAMES), cells
    for cell, name in zip(cells, LORA_NAMES, strict=True):
        assert cell.endswith(name[-8:]), (cell, name)  # e.g. "y.lora_A": the distinguishing end


# ---------------------------------------------------------------------------------------------------- heat map
def test_heatmap_columns_average_blocks_of_queries_past_the_threshold():
    from hookinf.report.content import HEATMAP_COLUMNS, heatmap_columns

    shares = torch.rand(HEATMAP_COLUMNS, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    same, block = heatmap_columns(shares)
    assert block == 1
    assert same is shares
    many = torch.rand(1001, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    columns, block = heatmap_columns(many, max_columns=250)
    assert block == 5  # ceil(1001 / 250)
    assert columns.shape == (201, 3)  # 200 blocks of 5 and the last query alone
    torch.testing.assert_close(columns[7], many[35:40].mean(dim=0))
    torch.testing.assert_close(columns[-1], many[1000])


def test_html_heatmap_of_many_queries_is_aggregated_and_says_so(tmp_path):
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(6)
    many = Scores({f"l{i}": torch.randn(1000, 30, generator=gen, dtype=torch.float64) for i in range(3)}, "exact")
    text = many.save_html(tmp_path / "many.html", queries=1, k=1).read_text()
    figure = text[text.index('id="influence-heatmap"') : text.index("</figure>", text.index('id="influence-heatmap"'))]
    assert "each column is the mean of 4 consecutive queries" in figure  # the caption
    assert "Aggregated: each column is the mean of 4 consecutive queries" in figure  # the plot's own title
    few = synthetic().save_html(tmp_path / "few.html", queries=1, k=1).read_text()
    assert "consecutive queries" not in few
    assert "columns: queries in order" in few


# ---------------------------------------------------------------------------------------------------- descriptions
def described(ids: bool = False) -> Scores:
    images = digit_images(N_TRAIN)
    return synthetic(ids=ids).with_descriptions(
        train_text=[f"digit <{j}>" for j in range(N_TRAIN)],
        query_text=[f"test {q}" for q in range(N_QUERY)],
        train_images=images,
        query_images=digit_images(N_QUERY).numpy(),
        query_labels=list(range(N_QUERY)),
        query_predictions=torch.tensor([0, 1, 9, 3, 9, 5, 9]),
    )


@pytest.mark.parametrize("ids", [False, True], ids=["columns", "store-ids"])
def test_reports_use_the_descriptions_the_scores_carry(tmp_path, ids):
    pytest.importorskip("matplotlib")
    scores = described(ids)
    text = scores.save_html(tmp_path / "d.html", queries=[2], k=2).read_text()
    top = scores.top_k(2)
    column = int(top.harmful[2, 0])
    assert f'data-train="{int(top.harmful_ids[2, 0])}"' in text
    assert f"digit &lt;{column}&gt;" in text  # the text of that column, looked up by its id
    assert "Query 2: label 2, predicted 9 · test 2" in text
    assert text.count("<img") == 1 + 2 * 2  # the query's picture and each listed example's
    terminal = render(scores_report(scores, queries=[2], k=2))
    assert f"digit <{column}>" in terminal
    assert "label 2, predicted 9 · test 2" in terminal
    assert described().descriptions.misclassified() == [2, 4, 6]
    # a describe function given still wins over the saved text
    assert "mine" in render(scores_report(scores, queries=[2], k=1, describe=lambda i: "mine"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("train_text", ["a"] * (N_TRAIN - 1), f"train_text has {N_TRAIN - 1} entries; the scores have {N_TRAIN}"),
        ("query_text", "abc", "query_text must be a list of strings"),
        ("query_labels", torch.zeros(N_QUERY), "query_labels must be integers"),
        ("query_predictions", [0] * (N_QUERY + 1), f"the scores have {N_QUERY} queries"),
        ("train_images", torch.zeros(N_TRAIN, 4), "train_images must be real numbers [n, H, W]"),
        ("query_images", torch.full((N_QUERY, 2, 2), float("nan")), "query_images hold NaN"),
    ],
)
def test_bad_descriptions_are_configuration_errors(field, value, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        synthetic().with_descriptions(**{field: value})


def test_descriptions_survive_grouping():
    scores = described()
    grouped = scores.grouped(lambda name: "all")
    assert grouped.layers == ("all",)
    assert grouped.descriptions is scores.descriptions
