"""Evaluation metrics on constructed embeddings: a perfect model scores 1, a
random one scores near chance, ties never flatter a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peflow.evaluate.retrieval import dsl_reweight, recall_at_k, retrieval_metrics, similarity
from peflow.evaluate.templates import TEMPLATE_SETS, fill, get_templates, prompts
from peflow.evaluate.zeroshot import class_embeddings, robustness_average, topk_correct, zeroshot_metrics

E = 32
NAMES = ["circle", "square", "triangle", "star", "hexagon", "pentagon",
         "cross", "heart", "diamond", "ring", "crescent", "arrow"]
C = len(NAMES)


def _onehot_encoder(classnames):
    """A text encoder that maps every prompt naming class i to direction i (plus
    template noise), so a matching image encoder is a perfect model."""
    g = torch.Generator().manual_seed(0)
    basis = F.normalize(torch.randn(len(classnames), E, generator=g), dim=-1)

    def encode(texts):
        out = []
        for t in texts:
            i = next(j for j, c in enumerate(classnames) if f" {c}" in f" {t.rstrip('.')} ")
            out.append(basis[i] + 0.05 * torch.randn(E, generator=g))
        return torch.stack(out)

    return encode, basis


def test_templates_fill_and_sets():
    assert fill("a photo of a {c}.", "arrow") == "a photo of an arrow."
    assert fill("a {c}.", "star") == "a star."
    assert fill("A {c} in the middle.", "hexagon") == "A hexagon in the middle."
    with pytest.raises(ValueError, match="placeholder"):
        fill("a photo", "star")
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("nope")
    for name, ts in TEMPLATE_SETS.items():
        assert ts and all("{c}" in t for t in ts), name
        assert len(set(ts)) == len(ts), name
    p = prompts(["circle", "ring"], get_templates("corpus"))
    assert len(p) == 2 and len(p[0]) == len(get_templates("corpus"))


def test_class_embeddings_are_normalised_template_means():
    names = NAMES
    encode, basis = _onehot_encoder(names)
    cls = class_embeddings(encode, names, get_templates("simple"))
    assert cls.shape == (C, E)
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(C))
    assert (F.cosine_similarity(cls, basis) > 0.95).all()


def test_perfect_model_scores_one():
    names = NAMES
    encode, basis = _onehot_encoder(names)
    cls = class_embeddings(encode, names, get_templates("corpus"))
    labels = torch.arange(200) % C
    g = torch.Generator().manual_seed(1)
    imgs = 3.0 * basis[labels] + 0.01 * torch.randn(200, E, generator=g)  # unnormalised on purpose
    m = zeroshot_metrics({"test": (imgs, labels), "shift_sketch": (imgs[:50], labels[:50])}, cls)
    assert m["zeroshot/test/top1"] == m["zeroshot/test/top5"] == 1.0
    assert m["zeroshot/shift_sketch/top1"] == 1.0
    assert m["zeroshot/robustness_avg"] == 1.0
    assert m["zeroshot/chance_top1"] == pytest.approx(1 / C)

    # retrieval: the caption of image i embeds like image i
    caps = basis[labels] + 0.01 * torch.randn(200, E, generator=g)
    caps[:, :] += 0.2 * F.normalize(torch.randn(200, E, generator=g), dim=-1)  # images of a class differ
    imgs_r = caps + 0.001 * torch.randn(200, E, generator=g)
    r = retrieval_metrics(imgs_r, caps, torch.arange(200), dsl=True)
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert r[f"retrieval/{d}/R{k}"] == 1.0
            assert r[f"retrieval_dsl/{d}/R{k}"] == 1.0
    assert r["retrieval/mean_recall"] == 1.0


def test_random_model_scores_near_chance():
    g = torch.Generator().manual_seed(2)
    n = 3000
    cls = F.normalize(torch.randn(C, E, generator=g), dim=-1)
    labels = torch.randint(0, C, (n,), generator=g)
    m = zeroshot_metrics({"test": (torch.randn(n, E, generator=g), labels)}, cls)
    assert abs(m["zeroshot/test/top1"] - 1 / C) < 0.03
    assert abs(m["zeroshot/test/top5"] - 5 / C) < 0.05

    N = 500
    r = retrieval_metrics(torch.randn(N, E, generator=g), torch.randn(N, E, generator=g), torch.arange(N))
    for d in ("i2t", "t2i"):
        assert r[f"retrieval/{d}/R1"] < 0.02
        assert abs(r[f"retrieval/{d}/R10"] - 10 / N) < 0.02


def test_ties_count_against_the_model():
    logits = torch.zeros(4, C)  # a collapsed model: every class ties
    assert topk_correct(logits, torch.arange(4)) == {1: 0, 5: 0}
    r = recall_at_k(torch.zeros(6, 6), torch.arange(6))
    assert r["i2t/R1"] == r["t2i/R1"] == 0.0


def test_recall_with_several_captions_per_image():
    # 2 images, 4 captions: captions 0,1 -> image 0; 2,3 -> image 1
    owner = torch.tensor([0, 0, 1, 1])
    s = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.1, 0.8], [0.95, 0.2]])  # texts x images
    r = recall_at_k(s, owner, ks=(1, 2))
    # t2i: caption 0 -> image 0 (hit), 1 -> image 1 (miss), 2 -> image 1 (hit), 3 -> image 0 (miss)
    assert r["t2i/R1"] == 0.5 and r["t2i/R2"] == 1.0
    # i2t: image 0's best text is caption 3 (not its own) -> miss at 1, own caption 0 second -> hit at 2;
    # image 1's best text is caption 2 (own) -> hit
    assert r["i2t/R1"] == 0.5 and r["i2t/R2"] == 1.0
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k(s, torch.tensor([0, 0, 0, 0]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(s, torch.tensor([0, 1, 2, 0]))


def test_dsl_reweighting_follows_the_pe_protocol():
    g = torch.Generator().manual_seed(3)
    s = similarity(torch.randn(20, E, generator=g), torch.randn(15, E, generator=g))
    w = dsl_reweight(s)
    torch.testing.assert_close(w, s * torch.softmax(s, dim=0))
    # within each image's column the order of texts is unchanged (image-to-text unaffected)
    assert torch.equal(s.argsort(dim=0), w.argsort(dim=0))


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        robustness_average({})
    with pytest.raises(ValueError, match="labels"):
        topk_correct(torch.zeros(3, C), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class name"):
        class_embeddings(lambda t: torch.zeros(len(t), E), [], ["a {c}."])
